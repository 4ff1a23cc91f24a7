"""Clients: a real two-worker LocalCluster (loopback), scheduler address, jobqueue scripts."""
import builtins
import os
import re
import shutil
import subprocess
import sys
import uuid

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


def _listening(pid):
    """(ip, port) of every listening TCP socket of ``pid`` and its child processes."""
    psutil = pytest.importorskip("psutil")
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


@pytest.mark.parametrize("dashboard", [True, False])
def test_local_cluster_listens_on_loopback_only(dashboard):
    client, desc = cluster.get_client(n_workers=1, dashboard=dashboard)
    try:
        sockets = _listening(os.getpid())
        assert sockets, "a cluster with no listening socket?"
        assert {ip for ip, _ in sockets} <= {"127.0.0.1"}, sockets
        if dashboard:
            port = int(re.search(r"dashboard http://127\.0\.0\.1:(\d+)/status", desc).group(1))
            assert ("127.0.0.1", port) in sockets  # the printed link is where it listens
    finally:
        cluster.close_client(client)


def test_dashboard_address_opens_the_dashboard_with_a_warning():
    with pytest.warns(UserWarning, match="every interface without authentication"):
        client, desc = cluster.get_client(n_workers=1, dashboard_address="0.0.0.0:0")
    try:
        port = int(re.search(r"dashboard http://[^:]+:(\d+)/status", desc).group(1))
        assert ("0.0.0.0", port) in _listening(os.getpid())
    finally:
        cluster.close_client(client)


@pytest.mark.parametrize("address, warns", [("127.0.0.1:8787", False), ("localhost:0", False), ("[::1]:8787", False),
                                            (":8787", True), ("10.1.2.3:8787", True), ("beamline-pc:8787", True)])
def test_check_dashboard_address(address, warns, recwarn):
    assert cluster.check_dashboard_address(address) == address
    assert bool([w for w in recwarn if "without authentication" in str(w.message)]) == warns
    assert cluster.check_dashboard_address(None) == "127.0.0.1:8787"


@pytest.mark.parametrize("address", ["8787", "host:", "host:port", "1.2.3.4:99999"])
def test_bad_dashboard_address_is_a_parameter_error(address):
    with pytest.raises(ParameterError, match="--dashboard-address"):
        cluster.check_dashboard_address(address)


def test_jobqueue_dashboard_binds_loopback_by_default():
    jq = cluster.make_jobqueue_cluster("slurm", cores=1, memory="1GB", interface="lo")
    try:
        options = jq.scheduler_spec["options"]
        assert options["dashboard_address"] == "127.0.0.1:8787"
    finally:
        jq.close()


@pytest.mark.slow
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


# ------------------------------------------------------------------------------ a real SLURM

def _slurm_unavailable() -> str | None:
    """Why no SLURM here takes jobs (None when one does). ci/slurm.sh starts one as root."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch/sinfo are not installed (bash ci/slurm.sh, as root, installs and starts a one-node SLURM)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%a %t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s (is slurmctld running? bash ci/slurm.sh starts it)"
    if out.returncode != 0:
        return f"sinfo failed: {' '.join(out.stderr.split())} (bash ci/slurm.sh starts slurmctld/slurmd)"
    if not re.search(r"^up (idle|mix)", out.stdout, flags=re.M):
        return f"no SLURM partition is up with an idle node (sinfo: {' '.join(out.stdout.split())!r})"
    return None


@pytest.mark.slow
@pytest.mark.slow
def test_demo_on_slurm_refines_every_lineout_in_a_slurm_job(tmp_path):
    """``midasflow demo --cluster slurm --jobs 2``: every lineout's worker was started by one of
    the two SLURM jobs that dask-jobqueue submitted for this run."""
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    job_name = f"mf-test-{uuid.uuid4().hex[:8]}"  # this run's jobs, apart from any others
    env = dict(os.environ, DASK_JOBQUEUE__SLURM__NAME=job_name,
               DASK_JOBQUEUE__SLURM__INTERFACE="lo")  # scheduler and workers on loopback
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "midasflow", "demo", "--out", "demo", "--frames", "4",
             "--cluster", "slurm", "--jobs", "2", "--cores", "1", "--memory", "2GB",
             "--walltime", "00:20:00"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    finally:  # jobs of a killed run must not wait for their walltime
        subprocess.run(["scancel", "--name", job_name], capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SLURMCluster: 2 job(s)" in proc.stderr

    # slurmctld knows this run's jobs (it keeps finished ones for MinJobAge): two, run in this folder
    listing = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, timeout=30).stdout
    ours = [line for line in listing.splitlines() if f"JobName={job_name} " in line]
    assert len(ours) == 2 and all(f"WorkDir={tmp_path} " in line for line in ours), ours
    job_ids = {re.search(r"JobId=(\d+)", line).group(1) for line in ours}
    # each job's output (its worker's log) is slurm-<job id>.out in the submit folder
    started: dict[str, str] = {}  # worker address -> SLURM job id
    for job_id in job_ids:
        log = tmp_path / f"slurm-{job_id}.out"
        for address in re.findall(r"Start worker at:\s+(\S+)", log.read_text() if log.exists() else ""):
            started[address] = job_id
    assert started, "no SLURM job of this run logged a worker start"

    from midasflow.results import open_results

    results = open_results(tmp_path / "demo" / "refinement" / "results.zarr")
    status, worker = results["status"].values.ravel(), results["worker"].values.ravel()
    assert status.size == 2 * 72 and (status == "ok").all()  # 4 frames / 2 per group x 72 η bins
    assert set(worker) <= set(started), set(worker) - set(started)
