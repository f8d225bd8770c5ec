"""A vLLM-compatible serving engine for tests and the demo: vLLM's OpenAI HTTP protocol, metrics and
NixlConnector handshake, with the timing of the calibrated latency model instead of a GPU.

`batching` is the continuous-batching scheduler, `kv` the prefill/decode KV handshake, `metrics`
vLLM's Prometheus series, `protocol` the OpenAI request and response shapes, `server` the aiohttp
application that ties them together (`ampacity serving engine`).
"""
