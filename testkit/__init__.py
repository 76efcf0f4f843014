"""Shared test infrastructure: real servers for the tests and the benchmark.

- `testkit.fake_upstream`: a fake Anthropic / OpenAI-compatible streaming upstream
  (also runnable on its own: `python -m testkit.fake_upstream --port 8001`);
- `testkit.servers`: free ports, sserelay under uvicorn in a thread or as a process, a
  private Redis, a one-document JSON server;
- `testkit.sse`: reading an SSE response the way a client does.

The dependency goes one way: `tests/` and `bench/` import `testkit`; `testkit` imports
neither (it may import the product, `app` and its packages, since it runs it). Helpers
that only the test suite needs (settings, tokens, config files) stay in `tests/support.py`.
"""
