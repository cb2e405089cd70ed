"""The Open Inference / Triton ``inference`` protos, kept out of protobuf's default pool.

Use ``from weir_proto.inference import messages as pb`` for the message classes and
``weir_proto.inference.pool`` for descriptors (reflection, method paths).
"""
