"""A one-node Slurm cluster on this machine, for tests: munged, slurmctld and slurmd on
localhost with their own configuration, ports, sockets, state and logs under one folder.

Debian's packages (apt-get install -y slurm-wlm munge) provide the daemons; everything runs
as root, which Slurm needs to start jobs. Client commands find the cluster through
SLURM_CONF (`env`). `stop` cancels the jobs and ends the three daemons by their pid files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo")


def why_unavailable() -> str | None:
    """Why a local cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts jobs as their users)"
    missing = [b for b in DAEMONS + CLIENTS if not shutil.which(b, path=_sbin_path())]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing); Debian: "
                "apt-get install -y slurm-wlm munge")
    return None


def _sbin_path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: the sockets stay bound until all are chosen (one at a time, the
    kernel may hand out the same port twice, and slurmctld then finds slurmd on its port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.run_dir = self.root / "run"  # munged wants its socket folder open to all
        self.log_dir = self.root / "log"
        self.jobcomp = self.log_dir / "jobcomp.txt"
        self.started: list[str] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": _sbin_path()}

    def _path(self, name: str) -> str:
        return shutil.which(name, path=_sbin_path())

    def start(self, timeout: float = 60) -> None:
        for d in ("munge", "state", "spool", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.run_dir.chmod(0o755)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = self.run_dir / "munge.sock"
        self._daemon("munged", f"--socket={sock}", f"--key-file={key}",
                     f"--pid-file={self.run_dir}/munged.pid", f"--log-file={self.log_dir}/munged.log",
                     f"--seed-file={self.root}/munge/seed")
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(f"""\
ClusterName=lighthouse-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.run_dir}/slurmctld.pid
SlurmdPidFile={self.run_dir}/slurmd.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
# No cgroups in a container: processes are tracked by parent id, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# A line per job end (requeues included), with start and end times.
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to scontrol for the checks.
MinJobAge=3600
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._daemon("slurmctld", "-f", str(self.conf))
        self._daemon("slurmd", "-f", str(self.conf))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the local Slurm node did not come up (sinfo says {state!r}):\n{self.logs()}")

    def _daemon(self, name: str, *args: str) -> None:
        proc = subprocess.run([self._path(name), *args], env=self.env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name} did not start: {proc.stderr.strip()}\n{self.logs()}")
        self.started.append(name)

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's record of a job, as key=value pairs."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def logs(self) -> str:
        parts = []
        for f in sorted(self.log_dir.glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {f.name} (end)\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, then end the daemons this object started, by their pid files."""
        if "slurmctld" in self.started:
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).strip():
                time.sleep(0.5)
        for name in reversed(self.started):
            pid_file = self.run_dir / f"{name}.pid"
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            _terminate(pid)
        self.started.clear()


def _terminate(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
