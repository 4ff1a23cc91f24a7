"""Clients: a real two-worker LocalCluster (loopback), scheduler address, jobqueue scripts."""
import builtins

import pytest

from midasflow import cluster
from midasflow.errors import BackendError, ParameterError


def test_local_cluster_two_workers_runs_tasks():
    client, desc = cluster.get_client(n_workers=2, dashboard=False)
    try:
        assert len(client.scheduler_info()["workers"]) == 2
        assert desc.startswith("LocalCluster: 2 workers x 1 thread") and "tcp://127.0.0.1:" in desc
        assert "no dashboard" in desc
        assert client.submit(sum, [1, 2, 3], key="sum-test").result() == 6
        # a second client through the scheduler address sees the same workers
        other, desc2 = cluster.get_client(scheduler=client.scheduler.address)
        try:
            assert "2 workers" in desc2 and desc2.startswith("scheduler tcp://127.0.0.1:")
        finally:
            other.close()
    finally:
        cluster.close_client(client)


def test_local_cluster_description_has_dashboard_link():
    client, desc = cluster.get_client(n_workers=1, dashboard=True)
    try:
        assert "dashboard http://127.0.0.1:" in desc and desc.endswith("/status")
    finally:
        cluster.close_client(client)


def test_unreachable_scheduler_is_a_backend_error():
    with pytest.raises(BackendError, match="--scheduler tcp://127.0.0.1:9"):
        cluster.get_client(scheduler="tcp://127.0.0.1:9", timeout_s=2)


@pytest.mark.parametrize("kind, directive, queue_flag", [("slurm", "#SBATCH", "-p debugq"), ("pbs", "#PBS", "-q debugq")])
def test_jobqueue_job_script_carries_the_resources(kind, directive, queue_flag):
    jq = cluster.make_jobqueue_cluster(kind, queue="debugq", cores=8, memory="16GB", walltime="01:30:00",
                                       dashboard=False, interface="lo")
    try:
        script = jq.job_script()
    finally:
        jq.close()
    assert directive in script and queue_flag in script
    assert "01:30:00" in script
    assert "--nworkers 8" in script and "--nthreads 1" in script
    assert "mem=15G" in script  # dask-jobqueue rounds 16GB down to 15 GiB


def test_jobqueue_needs_cores_and_memory_and_a_known_kind():
    with pytest.raises(ParameterError, match="--cores and --memory"):
        cluster.make_jobqueue_cluster("slurm", queue="q")
    with pytest.raises(ParameterError, match="expected one of"):
        cluster.make_jobqueue_cluster("lsf-ish", cores=1, memory="1GB")


def test_missing_dask_jobqueue_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "dask_jobqueue":
            raise ImportError("No module named 'dask_jobqueue'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(BackendError, match=r"install midasflow\[cluster\]"):
        cluster.get_client(cluster="slurm", cores=4, memory="8GB")
