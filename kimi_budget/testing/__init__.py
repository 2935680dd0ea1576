"""A loopback stand-in for Moonshot's Kimi API, for tests, demos and benchmarks.

:class:`MoonshotStandIn` is a real HTTP/1.1 server on 127.0.0.1 that speaks Moonshot's wire
protocol with its quirks (``cached_tokens`` at the top level of ``usage``, stream usage inside
the final choice, errors as ``{"error": {"type": ..., "message": ...}}``, 429 without
``Retry-After``), checks the context window, simulates automatic prefix caching, and can be
scripted to fail in every way the real service does. It uses the standard library only.

Example::

    import openai
    from kimi_budget.testing import Fault, MoonshotStandIn

    with MoonshotStandIn(api_key="sk-test") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        resp = client.chat.completions.create(
            model="kimi-k2.5", messages=[{"role": "user", "content": "hi"}]
        )
        assert resp.usage is not None
        print(resp.usage.prompt_tokens, resp.usage.model_extra["cached_tokens"])

        server.fail_next(429, "rate_limit_reached_error")  # the next chat call gets a 429
        server.queue_fault(Fault.drop_stream(after_chunks=3))  # the one after: a torn stream
        assert server.billed[0]["completion_tokens"] == resp.usage.completion_tokens

From a shell, ``python -m kimi_budget.testing --port 8765`` serves in the foreground and
prints its base URL.

What the server reports is what Moonshot would bill: :attr:`MoonshotStandIn.billed` holds the
usage of every chat response delivered complete with usage, and
:attr:`MoonshotStandIn.would_bill` also counts responses whose usage never reached the client
(dropped or abandoned streams, responses stripped of usage), because Moonshot bills those too.

Modules: ``_models`` (models, canned reply, constants), ``_faults`` (scripted misbehaviour),
``_wire`` (server, handler, recorded requests), ``_text`` (replies split at token boundaries),
``_core`` (state and HTTP plumbing), ``_chat`` (chat completions and streams), ``_standin``
(lifecycle, scripting, routing), ``_main`` (the command line).
"""

from __future__ import annotations

from ._faults import OMIT, Fault, FaultKind
from ._main import main
from ._models import DEFAULT_REPLY, KNOWN_MODELS, ModelInfo
from ._standin import MoonshotStandIn
from ._wire import RecordedRequest

__all__ = [
    "DEFAULT_REPLY",
    "KNOWN_MODELS",
    "OMIT",
    "Fault",
    "FaultKind",
    "ModelInfo",
    "MoonshotStandIn",
    "RecordedRequest",
    "main",
]
