"""The deployment files: docker-compose.yml (validated by Debian's docker-compose), .env.example,
dagster.yaml (loaded as a real DagsterInstance on the embedded PostgreSQL), the workspaces, the
Kubernetes values and GPU tag, the executors and the `deer-pipeline ui` start-up checks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
LONG_RUNNING = {"postgres", "code-location", "webserver", "daemon", "redis", "gpu-worker", "cpu-worker"}


# ------------------------------------------------------------------------------------------
# docker-compose
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose_config() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/system-deps.sh installs it)")
    proc = subprocess.run(
        [exe, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "--profile", "celery", "config"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    assert "is not set" not in proc.stderr, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_validates_and_has_every_service(compose_config):
    services = compose_config["services"]
    assert set(services) == LONG_RUNNING | {"migrate"}
    assert services["postgres"]["image"] == "pgvector/pgvector:pg16"
    assert services["redis"]["profiles"] == ["celery"]
    assert services["gpu-worker"]["profiles"] == ["celery"]
    assert "code-server" in services["code-location"]["command"]
    assert "deer_pipeline.definitions" in services["code-location"]["command"]
    assert services["migrate"]["command"] == ["deer-pipeline", "db", "migrate"]
    assert services["code-location"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    daemon_cmd = " ".join(services["daemon"]["command"])
    assert "dagster-daemon run" in daemon_cmd
    assert "concurrency set gpu" in daemon_cmd and "concurrency set identity 1" in daemon_cmd


def test_gpu_is_reserved_for_the_inference_services(compose_config):
    services = compose_config["services"]
    for name in ("gpu-worker", "code-location"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
    assert "deploy" not in services["webserver"]
    worker_cmd = services["gpu-worker"]["command"]
    assert worker_cmd[worker_cmd.index("-Q") + 1] == "gpu"
    assert worker_cmd[worker_cmd.index("-c") + 1] == "1"
    assert "deer_pipeline.ops.celery_app" in worker_cmd


def test_images_are_mounted_read_only_and_crops_writable(compose_config):
    mounted = 0
    for name, service in compose_config["services"].items():
        for volume in service.get("volumes", []):
            if volume["target"] == "/images":
                mounted += 1
                assert volume.get("read_only") is True, f"{name} mounts the photos writable"
            if volume["target"] == "/data/crops":
                assert not volume.get("read_only"), f"{name} cannot write crops"
    assert mounted >= 3        # code location + both workers
    assert {"pgdata", "crops", "dagster_storage"} <= set(compose_config["volumes"])


def test_every_long_running_service_has_a_health_check(compose_config):
    for name in LONG_RUNNING:
        check = compose_config["services"][name].get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"


def test_secrets_come_from_the_env_file(compose_config):
    env = compose_config["services"]["code-location"]["environment"]
    example = _env_example()
    assert env["DAGSTER_POSTGRES_URL"].startswith("postgresql+psycopg2://")
    assert example["POSTGRES_PASSWORD"] in env["DEER_DATABASE_URL"]
    assert example["REDIS_PASSWORD"] in env["DEER_CELERY_BROKER_URL"]
    # No password is written into the compose file itself.
    text = COMPOSE.read_text()
    assert example["POSTGRES_PASSWORD"] not in text and example["REDIS_PASSWORD"] not in text


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _compose_variables() -> set[str]:
    text = COMPOSE.read_text().replace("$$", "")     # $$ is a literal $ for the container's shell
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    names |= set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text))
    return names


def test_every_compose_variable_is_in_env_example():
    used = _compose_variables()
    defined = set(_env_example())
    assert used, "no variables found in docker-compose.yml"
    assert not used - defined, f"missing from .env.example: {sorted(used - defined)}"
    assert not defined - used, f"unused in docker-compose.yml: {sorted(defined - used)}"


def test_compose_refuses_to_start_without_a_password(tmp_path):
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/system-deps.sh installs it)")
    env = {k: v for k, v in _env_example().items() if k != "POSTGRES_PASSWORD"}
    env_file = tmp_path / "partial.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    proc = subprocess.run([exe, "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr


def test_dockerfile_has_the_targets_compose_builds(compose_config):
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    for name, service in compose_config["services"].items():
        build = service.get("build")
        if build:
            assert Path(build["dockerfile"]).name == "Dockerfile"
            assert build["target"] in targets, (name, build["target"], targets)
    text = DOCKERFILE.read_text()
    assert "torch==2.15.0" in text and "pip install -e '.[celery]'" in text
    # The pins in the images are the project's pins.
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    for pin in re.findall(r"(dagster[a-z-]*==[0-9.]+|torch(?:vision)?==[0-9.]+)", text):
        assert pin in pyproject, f"{pin} in docker/Dockerfile is not the pin in pyproject.toml"


# ------------------------------------------------------------------------------------------
# Dagster instance and workspaces
# ------------------------------------------------------------------------------------------

@pytest.fixture
def dagster_instance(tmp_path, monkeypatch):
    import dagster as dg

    from deer_pipeline import db

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", db.dagster_storage_url())
    instance = dg.DagsterInstance.from_config(str(home))
    yield instance
    instance.dispose()


def test_dagster_yaml_loads_on_postgres_with_the_queue_and_pools(dagster_instance):
    from dagster._core.instance.config import PoolGranularity
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    instance = dagster_instance
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert not instance.telemetry_enabled
    assert instance.run_monitoring_enabled
    assert instance.run_retries_enabled and instance.run_retries_max_retries >= 1

    concurrency = instance.get_concurrency_config()
    assert concurrency.pool_config.default_pool_limit == 1
    assert concurrency.pool_config.pool_granularity == PoolGranularity.OP
    assert concurrency.run_queue_config.max_concurrent_runs >= 1
    assert {"key": "dagster/backfill", "limit": 2} in concurrency.run_queue_config.tag_concurrency_limits


def test_pools_default_to_one_and_can_be_set(dagster_instance, monkeypatch):
    from deer_pipeline.defs.executors import GPU_POOL, IDENTITY_POOL, apply_pool_limits

    storage = dagster_instance.event_log_storage
    try:
        for pool in (GPU_POOL, IDENTITY_POOL):
            info = storage.get_concurrency_info(pool)
            assert info.limit == 1 and info.using_default_limit, pool
        monkeypatch.setenv("DEER_GPU_SLOTS", "2")
        assert apply_pool_limits(dagster_instance) == {GPU_POOL: 2, IDENTITY_POOL: 1}
        limits = {p.name: p.limit for p in storage.get_pool_limits() if p.name in (GPU_POOL, IDENTITY_POOL)}
        assert limits == {GPU_POOL: 2, IDENTITY_POOL: 1}
        with pytest.raises(ValueError, match="identity"):
            apply_pool_limits(dagster_instance, {IDENTITY_POOL: 2})
        monkeypatch.setenv("DEER_GPU_SLOTS", "0")
        with pytest.raises(ValueError, match="DEER_GPU_SLOTS"):
            apply_pool_limits(dagster_instance)
    finally:
        for pool in (GPU_POOL, IDENTITY_POOL):
            storage.delete_concurrency_limit(pool)


def test_workspaces_name_the_code_location():
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin
    from dagster._core.workspace.load import location_origins_from_yaml_paths

    local = location_origins_from_yaml_paths([str(REPO_ROOT / "workspace.yaml")])
    assert [o.location_name for o in local] == ["deer_pipeline"]
    target = local[0].loadable_target_origin
    assert target.module_name == "deer_pipeline.definitions" and target.attribute == "defs"

    compose = location_origins_from_yaml_paths([str(REPO_ROOT / "docker" / "workspace.yaml")])
    assert [o.location_name for o in compose] == ["deer_pipeline"]
    origin = compose[0]
    assert isinstance(origin, GrpcServerCodeLocationOrigin)
    assert (origin.host, origin.port) == ("code-location", 4000)


# ------------------------------------------------------------------------------------------
# Executors
# ------------------------------------------------------------------------------------------

def test_executor_follows_deer_executor(monkeypatch):
    import dagster as dg

    from deer_pipeline.defs import executors

    monkeypatch.delenv("DEER_EXECUTOR", raising=False)
    assert executors.executor_from_env() is None
    monkeypatch.setenv("DEER_EXECUTOR", "in_process")
    assert executors.executor_from_env() is dg.in_process_executor
    monkeypatch.setenv("DEER_EXECUTOR", "celery")
    monkeypatch.setenv("DEER_CELERY_BROKER_URL", "redis://broker.invalid:6379/0")
    celery = executors.executor_from_env()
    assert celery.name == "deer_celery_executor"
    monkeypatch.setenv("DEER_EXECUTOR", "kubernetes")
    with pytest.raises(ValueError, match="DEER_EXECUTOR"):
        executors.executor_from_env()
    assert executors.GPU_STEP_TAGS == {"dagster-celery/queue": "gpu"}


def test_celery_settings_survive_a_lost_worker(monkeypatch):
    from deer_pipeline.ops import celery_app

    monkeypatch.setenv("DEER_CELERY_BROKER_URL", "redis://:pw@redis:6379/0")
    monkeypatch.delenv("DEER_CELERY_BACKEND_URL", raising=False)
    monkeypatch.setenv("DEER_CELERY_VISIBILITY_TIMEOUT_S", "600")
    settings = celery_app.celery_settings()
    assert settings["task_acks_late"] and settings["task_reject_on_worker_lost"]
    assert settings["worker_prefetch_multiplier"] == 1
    assert settings["broker_transport_options"]["visibility_timeout"] == 600
    assert celery_app.backend_url() == "redis://:pw@redis:6379/0"
    monkeypatch.setenv("DEER_CELERY_VISIBILITY_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="DEER_CELERY_VISIBILITY_TIMEOUT_S"):
        celery_app.celery_settings()
    # The worker app registers the tasks dagster-celery sends.
    assert {"execute_plan", "execute_job", "resume_job"} <= set(celery_app.app.tasks)
    assert celery_app.app.conf.task_acks_late is True


# ------------------------------------------------------------------------------------------
# deer-pipeline ui: start-up checks (the running UI is tested in test_ui_daemon_e2e.py)
# ------------------------------------------------------------------------------------------

def test_ui_names_the_missing_variable_in_production(monkeypatch, capsys):
    from deer_pipeline.ops import ui

    monkeypatch.setenv("DEER_DATABASE_URL", "postgresql://deer:pw@db.invalid:5432/deer")
    monkeypatch.delenv("DAGSTER_POSTGRES_URL", raising=False)
    assert ui.main(["-p", "3999"]) == 2
    err = capsys.readouterr().err
    assert "DAGSTER_POSTGRES_URL" in err


def test_ui_reads_the_variables_of_dagster_yaml(tmp_path):
    from deer_pipeline.ops import ui

    assert ui.required_env() == ["DAGSTER_POSTGRES_URL"]
    custom = tmp_path / "dagster.yaml"
    custom.write_text("storage:\n  postgres:\n    postgres_url:\n      env: A_URL\n"
                      "run_launcher:\n  config:\n    token: {env: 'B_TOKEN'}\n")
    assert ui.required_env(custom) == ["A_URL", "B_TOKEN"]
    assert ui.missing_env(custom, {"A_URL": "x"}) == ["B_TOKEN"]


def test_ui_passes_arguments_to_dagster_dev():
    from deer_pipeline.ops import ui

    cmd = ui.dev_command(["-p", "3000", "-h", "127.0.0.1"])
    assert cmd[1:4] == ["-m", "dagster", "dev"]
    assert cmd[cmd.index("-w") + 1] == str(REPO_ROOT / "workspace.yaml")
    assert cmd[-4:] == ["-p", "3000", "-h", "127.0.0.1"]
    assert "-w" not in ui.dev_command(["-m", "other.definitions"])


def test_ui_is_a_cli_command():
    from deer_pipeline.cli import COMMANDS

    assert COMMANDS["ui"][0] == "deer_pipeline.ops.ui"


# ------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
# Keys the chart's K8sRunLauncher schema accepts (runLauncher.config.k8sRunLauncher).
K8S_RUN_LAUNCHER_KEYS = {
    "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile",
    "envConfigMaps", "envSecrets", "envVars", "volumeMounts", "volumes", "labels",
    "failPodOnRunFailure", "resources", "schedulerName", "securityContext", "runK8sConfig"}


def test_helm_values_parse_and_match_the_instance():
    values = yaml.safe_load((K8S_DIR / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert set(launcher) <= K8S_RUN_LAUNCHER_KEYS, set(launcher) - K8S_RUN_LAUNCHER_KEYS
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "deer_pipeline.definitions", "-a", "defs"]
    assert values["postgresql"]["enabled"] is False
    assert values["telemetry"]["enabled"] is False
    # The same concurrency as dagster.yaml.
    instance_yaml = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    pools, runs = values["concurrency"]["pools"], values["concurrency"]["runs"]
    assert pools["defaultLimit"] == instance_yaml["concurrency"]["pools"]["default_limit"]
    assert pools["granularity"] == instance_yaml["concurrency"]["pools"]["granularity"]
    assert runs["maxConcurrentRuns"] == instance_yaml["concurrency"]["runs"]["max_concurrent_runs"]
    assert runs["tagConcurrencyLimits"] == instance_yaml["concurrency"]["runs"]["tag_concurrency_limits"]
    assert values["dagsterDaemon"]["runRetries"]["maxRetries"] == instance_yaml["run_retries"]["max_retries"]


def test_gpu_run_tag_builds_a_kubernetes_job_with_a_gpu():
    dagster_k8s = pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed (dev extra)")
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    assert dagster_k8s.__version__ == "0.29.27"
    tag_value = yaml.safe_load((K8S_DIR / "gpu-run-config.yaml").read_text())["dagster-k8s/config"]
    user_config = get_user_defined_k8s_config({"dagster-k8s/config": json.dumps(tag_value)})
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="registry.example.org/deer-pipeline:0.1.0",
                            dagster_home="/opt/dagster/dagster_home"),
        ["dagster", "api", "execute_run"], "dagster-run-test", user_defined_k8s_config=user_config)
    pod = job.spec.template.spec
    resources = pod.containers[0].resources
    assert resources.limits["nvidia.com/gpu"] == "1" and resources.requests["nvidia.com/gpu"] == "1"
    assert any(t.key == "nvidia.com/gpu" for t in pod.tolerations)
    assert job.spec.backoff_limit == 0

    # A misspelt key is refused by the Kubernetes model, so the check above means something.
    broken = {**tag_value, "container_config": {"resourcez": {}}}
    with pytest.raises(Exception, match="resourcez"):
        construct_dagster_k8s_job(
            DagsterK8sJobConfig(job_image="x", dagster_home="/h"), ["x"], "n",
            user_defined_k8s_config=get_user_defined_k8s_config(
                {"dagster-k8s/config": json.dumps(broken)}))


# ------------------------------------------------------------------------------------------
# System packages
# ------------------------------------------------------------------------------------------

def test_system_deps_script_is_idempotent_when_everything_is_there():
    script = REPO_ROOT / "scripts" / "system-deps.sh"
    text = script.read_text()
    for pkg in ("docker-compose", "redis-server", "chromium"):
        assert pkg in text
    if not all(shutil.which(c) for c in ("docker-compose", "redis-server", "chromium")):
        pytest.skip("system packages not installed here; scripts/system-deps.sh installs them")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""     # nothing to do, nothing said
