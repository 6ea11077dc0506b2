"""The ``embeddings`` asset through ``dg.materialize`` into the real pgvector store.

Version A = EfficientNet-Lite0 with average pooling, version B = the same with GeM pooling (a
different reduction, hence a different embedding version): both real, offline, quick on CPU.
"""

from __future__ import annotations

import warnings

import dagster as dg
import numpy as np
import pytest
import sqlalchemy as sa

from deer_pipeline.defs.embeddings import CHECK_NAME, build_embeddings_asset
from deer_pipeline.defs.partitions import CAMERA_PARTITIONS_NAME, partition_key
from deer_pipeline.defs.resources import (
    CropStore,
    DeerDatabase,
    IdentitySettings,
    InferenceResource,
    inference_resource_from_env,
)
from deer_pipeline.embedding import config as embedding_config
from deer_pipeline.embedding import models as embedders
from deer_pipeline.embedding import store as embedding_store
from deer_pipeline.settings import EmbeddingSettings
from deer_pipeline_tests.embedding.test_embedding_store import add_crops

warnings.filterwarnings("ignore", category=dg.BetaWarning)

CAMERA, DAY = "cam1", "2024-05-01"
KEY = partition_key(CAMERA, DAY)
MODEL = "efficientnet_lite0"


@pytest.fixture
def partition(engine, crop_dir):
    ids = add_crops(engine, CAMERA, DAY, 4, crop_dir=crop_dir, write_images=True)
    # One crop row whose file is corrupt: a failure record, not a failed run.
    bad = add_crops(engine, CAMERA, DAY, 1, crop_dir=crop_dir, start=90)[0]
    with engine.connect() as conn:
        rel = conn.execute(sa.text("SELECT crop_path FROM crops WHERE detection_id = :d"), {"d": bad}).scalar_one()
    (crop_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (crop_dir / rel).write_bytes(b"\xff\xd8 truncated")
    add_crops(engine, CAMERA, "2024-05-02", 2, crop_dir=crop_dir, write_images=True)   # not this partition
    return ids, bad


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, [CAMERA])
        yield inst


def _materialize(asset, instance, crop_dir, pooling):
    resources = {
        "database": DeerDatabase(),
        "crop_store": CropStore(root=str(crop_dir)),
        "inference": InferenceResource(models=[MODEL], pooling=pooling, device="cpu", batch_size=8,
                                       num_workers=0),
    }
    result = dg.materialize([asset], partition_key=KEY, instance=instance, resources=resources)
    assert result.success
    (mat,) = result.asset_materializations_for_node("embeddings")
    (check,) = result.get_asset_check_evaluations()
    return mat, check


def _stale_status(instance, asset):
    # Dagster's own staleness resolver (what the UI shows); internal test helper of dagster.
    from dagster._utils.test.data_versions import get_stale_status_resolver

    return get_stale_status_resolver(instance, [asset]).get_status(asset.key, str(KEY))


def _rows(engine, version):
    with engine.connect() as conn:
        return {r.detection_id: (r.status, r.created_at) for r in conn.execute(sa.text(
            "SELECT detection_id, status, created_at FROM embeddings WHERE embedding_version = :v"), {"v": version})}


def test_embeddings_materialise_rematerialise_switch_version_and_roll_back(engine, crop_dir, partition, instance):
    from dagster._core.definitions.data_version import StaleStatus

    ids, bad = partition
    version_a = embedding_config.versions(EmbeddingSettings(models=(MODEL,), pooling="avg"))[MODEL]
    version_b = embedding_config.versions(EmbeddingSettings(models=(MODEL,), pooling="gem"))[MODEL]
    assert version_a != version_b
    asset_a = build_embeddings_asset(EmbeddingSettings(models=(MODEL,), pooling="avg"))
    asset_b = build_embeddings_asset(EmbeddingSettings(models=(MODEL,), pooling="gem"))
    assert asset_a.code_versions_by_key[asset_a.key] != asset_b.code_versions_by_key[asset_b.key]
    # a backfill runs a range of partitions in one run, with the other camera x day assets
    assert asset_a.backfill_policy == dg.BackfillPolicy.single_run()

    # 1. Version A: every ok crop of the partition gets a vector, the corrupt one a failure row.
    mat, check = _materialize(asset_a, instance, crop_dir, "avg")
    md = mat.metadata
    assert md["crops"].value == 5 and md["new_vectors"].value == 5 and md["failures"].value == 1
    assert md["embedding_versions"].value == {MODEL: version_a}
    assert md["weights_used"].value.startswith("weights used: efficientnet_lite0: efficientnet_lite0 ImageNet weights")
    assert md["crops_per_s"].value > 0
    assert bad in md["failed_crops"].value
    assert check.check_name == CHECK_NAME
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN   # one failure, nothing missing
    rows_a = _rows(engine, version_a)
    assert set(rows_a) == set(ids) | {bad}
    assert rows_a[bad][0] == "failed" and all(rows_a[d][0] == "ok" for d in ids)
    got_ids, vecs_a = embedding_store.load_vectors(engine, version_a)
    assert got_ids == ids and vecs_a.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(vecs_a, axis=1), 1.0, atol=1e-5)
    assert _stale_status(instance, asset_a) == StaleStatus.FRESH

    # 2. Re-materialising adds nothing (the corrupt crop is retried in place, still failing).
    mat, _ = _materialize(asset_a, instance, crop_dir, "avg")
    assert mat.metadata["new_vectors"].value == 0
    assert embedding_store.count_embeddings(engine) == 5
    assert {d: r for d, r in _rows(engine, version_a).items() if d != bad} == \
        {d: r for d, r in rows_a.items() if d != bad}

    # 3. The configured version changes: the partition shows stale; materialising embeds B next to A.
    assert _stale_status(instance, asset_b) == StaleStatus.STALE
    mat, _ = _materialize(asset_b, instance, crop_dir, "gem")
    assert mat.metadata["new_vectors"].value == 5
    assert mat.metadata["embedding_versions"].value == {MODEL: version_b}
    assert embedding_store.count_embeddings(engine) == 10
    np.testing.assert_array_equal(embedding_store.load_vectors(engine, version_a)[1], vecs_a)   # A untouched
    vecs_b = embedding_store.load_vectors(engine, version_b)[1]
    assert vecs_b.shape == (4, 512) and not np.allclose(vecs_a, vecs_b, atol=1e-3)
    assert _stale_status(instance, asset_b) == StaleStatus.FRESH
    assert {r["embedding_version"] for r in embedding_store.registered_versions(engine)} == {version_a, version_b}

    # 4. Rollback to A: stale again (code version differs from B's run), re-materialises without new rows.
    assert _stale_status(instance, asset_a) == StaleStatus.STALE
    mat, _ = _materialize(asset_a, instance, crop_dir, "avg")
    assert mat.metadata["new_vectors"].value == 0 and mat.metadata["crops_embedded_now"].value == 1  # the corrupt one
    assert embedding_store.count_embeddings(engine) == 10
    assert _stale_status(instance, asset_a) == StaleStatus.FRESH


def test_empty_partition_materialises_without_loading_a_model(engine, crop_dir, instance):
    asset = build_embeddings_asset(EmbeddingSettings(models=(MODEL,)))
    mat, check = _materialize(asset, instance, crop_dir, "avg")
    assert mat.metadata["crops"].value == 0 and mat.metadata["new_vectors"].value == 0
    assert mat.metadata["backbone_passes_per_crop"].value == 0
    assert check.passed
    assert embedding_store.count_embeddings(engine) == 0


def test_code_version_and_resource_follow_the_environment(monkeypatch):
    monkeypatch.setenv("DEER_EMBEDDING_MODELS", "efficientnet_lite0")
    monkeypatch.setenv("DEER_DEVICE", "cpu")
    monkeypatch.setenv("DEER_BATCH_SIZE", "4")
    res = inference_resource_from_env()
    assert res.models == ["efficientnet_lite0"]
    asset = build_embeddings_asset()
    lite0 = EmbeddingSettings(models=("efficientnet_lite0",))
    assert asset.code_versions_by_key[asset.key] == embedding_config.code_version(lite0)
    assert InferenceResource(models=["efficientnet_lite0"], device="cpu", batch_size=4).embedding_settings() == \
        EmbeddingSettings(models=("efficientnet_lite0",), device="cpu", batch_size=4)
    assert embedding_config.code_version(lite0) != embedding_config.code_version(
        EmbeddingSettings(models=("efficientnet_lite0",), pooling="gem"))
    # a per-model weights file is part of the one configuration: every consumer sees it
    weights_file = embedders.lite0_weights_path()
    with_file = EmbeddingSettings(models=("efficientnet_lite0",), weights_files=(("efficientnet_lite0", str(weights_file)),))
    assert embedding_config.versions(with_file) == {m: s.version for m, s in InferenceResource(
        models=["efficientnet_lite0"], weights_files={"efficientnet_lite0": str(weights_file)}).specs().items()}
    assert IdentitySettings(ensemble_weights={"efficientnet_lite0": 1.0}).versions(with_file) == \
        embedding_config.versions(with_file)
    spec = asset.specs_by_key[asset.key]
    assert spec.group_name == "identification"
    assert [d.asset_key for d in spec.deps] == [dg.AssetKey("crops")]
    monkeypatch.setenv("DEER_EMBEDDING_MODELS", "efficientnet_lite0,vgg16")
    with pytest.raises(embedders.UnknownModel, match="vgg16"):
        inference_resource_from_env()
