"""Training jobs: the runner, executors, sweeps, registration of trained models and the built-in trainer."""
