"""The benchmark: harness, load generator, scenarios and report. Its servers (the fake
upstream, a private Redis) come from `testkit`; nothing here imports the test suite."""
