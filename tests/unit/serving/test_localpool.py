"""The local pool runs the Deployment's router arguments, less Kubernetes discovery."""

from __future__ import annotations

from ampacity.serving.eval.localpool import replace_flag, static_router_args

DEPLOYMENT = [
    "--host", "0.0.0.0", "--port", "8000", "--policy", "round_robin",
    "--prometheus-host", "0.0.0.0", "--prometheus-port", "29000",
    "--service-discovery", "--service-discovery-namespace", "team-a", "--service-discovery-port", "8000",
    "--health-check-interval-secs", "5",
    "--vllm-pd-disaggregation",
    "--prefill-selector", "app.kubernetes.io/instance=p", "app.kubernetes.io/component=prefill",
    "--decode-selector", "app.kubernetes.io/instance=p", "app.kubernetes.io/component=decode",
]  # fmt: skip


def test_discovery_is_replaced_by_local_urls_and_the_rest_is_kept() -> None:
    args = static_router_args(
        DEPLOYMENT, 9000, 9001, prefill=["http://127.0.0.1:1"], decode=["http://127.0.0.1:2"]
    )
    assert not [a for a in args if "discovery" in a or "selector" in a or "app.kubernetes.io" in a]
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "9000"
    assert args[args.index("--prometheus-host") + 1] == "127.0.0.1"
    assert args[args.index("--prometheus-port") + 1] == "9001"
    assert "--vllm-pd-disaggregation" in args and args[args.index("--policy") + 1] == "round_robin"
    assert args[args.index("--health-check-interval-secs") + 1] == "5"
    assert args[args.index("--prefill") + 1] == "http://127.0.0.1:1"
    assert args[args.index("--decode") + 1] == "http://127.0.0.1:2"
    workers = static_router_args(["--port", "8000"], 1, 2, workers=["http://a", "http://b"])
    assert workers[workers.index("--worker-urls") + 1 : workers.index("--worker-urls") + 3] == [
        "http://a",
        "http://b",
    ]
    assert replace_flag(["m", "--port", "8000"], "--port", "1") == ["m", "--port", "1"]
