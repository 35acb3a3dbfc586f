"""LLM routing: failover across Ollama and OpenAI-compatible servers behind circuit breakers.

Modules: `config` (the `llm:` section), `breaker` (pure circuit breaker), `budget` (retry
budget and backoff), `upstream` (wire clients and stream parsers), `registry` (per-server
state and selection), `router` (the loop-side facade with retries and the streaming commit
point), `actor` (RouterActor: active probes), `metrics`, `schemas`, `wiring`.
See docs/llm-routing.md. This package's `__init__` imports nothing, so `citadeld.config` can
import `citadeld.llm.config` without cycles.
"""
