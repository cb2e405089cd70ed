"""weir_proto.auth: token tables from a TOML file or WEIR_TOKENS, ordered roles, errors that name
the entry and never echo a token."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from weir_proto.auth import Identity, Role, TokenTable, bearer_token, new_token, token_digest
from weir_proto.errors import InvalidArgumentError


def test_a_token_file_maps_tokens_and_digests_to_names_and_roles(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(
        f'[[token]]\nname = "bot"\nrole = "deployer"\nsha256 = "{token_digest("s3cret")}"\n\n'
        '[[token]]\nname = "ops"\nrole = "ADMIN"\ntoken = "plain"\n'
    )
    table = TokenTable.from_file(path)
    assert table.identify("s3cret") == Identity("bot", Role.DEPLOYER)
    assert table.identify("plain") == Identity("ops", Role.ADMIN)
    assert table.identify("other") is None
    assert Role.VIEWER < Role.DEPLOYER < Role.APPROVER < Role.ADMIN


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[token]]\nname = "x"\nrole = "boss"\ntoken = "t"\n', "token #1 role: expected a role among viewer"),
        ('[[token]]\nrole = "viewer"\ntoken = "t"\n', "token #1 name: expected a non-empty name"),
        ('[[token]]\nname = "x"\nrole = "viewer"\n', "expected 'sha256' or 'token'"),
        ("[[token]\n", "cannot read the token file"),
    ],
)
def test_a_bad_token_file_is_refused_naming_the_entry(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError, match=message):
        TokenTable.from_file(path)


def test_weir_tokens_from_the_environment_and_its_errors_hide_the_token() -> None:
    table = TokenTable.load(None, {"WEIR_TOKENS": "a:viewer:tok-a, b:admin:tok:with:colons"})
    assert table is not None and len(table) == 2
    assert table.identify("tok:with:colons") == Identity("b", Role.ADMIN)
    assert TokenTable.load(None, {}) is None
    with pytest.raises(InvalidArgumentError) as refused:
        TokenTable.from_environment_value("a:viewer:tok-a,oops-secret")
    assert "entry #2" in refused.value.message and "oops-secret" not in refused.value.message


def test_only_bearer_authorization_metadata_counts() -> None:
    assert bearer_token([("authorization", "Bearer abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None


def test_the_replica_role_is_outside_the_order_and_passes_only_where_named() -> None:
    from weir_proto.auth import permits

    table = TokenTable.from_environment_value("node:replica:t-node")
    assert table.identify("t-node") == Identity("node", Role.REPLICA)
    for least in (Role.VIEWER, Role.DEPLOYER, Role.APPROVER, Role.ADMIN):
        assert not permits(Role.REPLICA, least)  # not even a viewer's reads
    assert permits(Role.REPLICA, frozenset({Role.REPLICA, Role.ADMIN}))
    assert permits(Role.ADMIN, frozenset({Role.REPLICA, Role.ADMIN}))
    for person in (Role.VIEWER, Role.DEPLOYER, Role.APPROVER):
        assert not permits(person, frozenset({Role.REPLICA, Role.ADMIN}))  # a viewer cannot attach
    assert permits(Role.VIEWER, Role.VIEWER) and not permits(Role.VIEWER, Role.DEPLOYER)


def test_new_tokens_never_read_as_a_command_line_option() -> None:
    # token_urlsafe starts with "-" one time in 64, and `weir ... --token -x...` then fails with
    # "expected one argument" (a CI run did). 2000 draws meet that case almost surely.
    parser = argparse.ArgumentParser()
    parser.add_argument("--token")
    tokens = [new_token() for _ in range(2000)]
    assert all(not token.startswith("-") for token in tokens)
    assert len(set(tokens)) == len(tokens)
    assert parser.parse_args(["--token", tokens[0]]).token == tokens[0]
