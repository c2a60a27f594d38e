"""Hostile numbers in HTTP requests: every numeric field is finite and bounded; a bad value is a 422 naming
the field, never a 500, and the keep-alive connection stays usable (issue 14, item 6)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.conftest import checkpoint, engine, server  # noqa: F401 - shared session fixtures

BASE = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# Raw JSON bodies: Python's json (and so the server) reads Infinity / NaN / 1e999 as non-finite floats.
BAD = [
    ("seed", str(2**80)),
    ("seed", "-1"),
    ("temperature", "Infinity"),
    ("temperature", "NaN"),
    ("temperature", "1e999"),
    ("temperature", "-0.5"),
    ("temperature", "1e6"),
    ("top_p", "NaN"),
    ("top_p", "0"),
    ("top_k", str(2**80)),
    ("top_k", "-3"),
    ("repetition_penalty", "-Infinity"),
    ("repetition_penalty", "0"),
    ("max_tokens", str(10**30)),
    ("max_tokens", "0"),
    ("max_tokens", "2.5"),
    ("n", "2"),
]


def _body(field: str, raw: str, endpoint: str) -> bytes:
    fields = dict(BASE) if endpoint == "chat/completions" else {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    fields.pop(field, None)
    return (json.dumps(fields)[:-1] + f', "{field}": {raw}}}').encode()


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_bad_numbers_are_422_naming_the_field_on_a_kept_alive_connection(server, endpoint):
    url, key = server
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for field, raw in BAD:
            r = client.post(f"/v1/{endpoint}", content=_body(field, raw, endpoint))
            assert r.status_code == 422, (field, raw, r.status_code, r.text)
            err = r.json()["error"]
            assert field in err["message"] and err["param"] == field, (field, raw, err)
        # the same connection still answers a good request (a 500 used to break keep-alive)
        r = client.post(f"/v1/{endpoint}", content=_body("seed", str(2**63 - 1), endpoint))
        assert r.status_code == 200, r.text


def test_largest_seed_and_extreme_but_valid_values_work(server):
    url, key = server
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={**BASE, "seed": 2**63 - 1, "temperature": 100, "top_p": 1e-9, "top_k": 10**6,
                         "repetition_penalty": 100})
    assert r.status_code == 200, r.text


def test_sampling_config_refuses_non_finite_values():
    from baichuan2.model.generate import SamplingConfig

    for bad in (dict(temperature=float("inf")), dict(top_p=float("nan")), dict(repetition_penalty=float("inf")),
                dict(seed=2**80), dict(seed=-1)):
        with pytest.raises(ValueError, match="invalid sampling"):
            SamplingConfig(**bad)
