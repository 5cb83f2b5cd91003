"""A real, private Slurm cluster on this machine, for the tests of slurm/*.sh.

    with SlurmCluster() as cluster:                    # munged, slurmctld, slurmd -N n1, slurmd -N n2
        job = cluster.submit("--nodes=2", "slurm/train.sh", "configs/smoke.yaml")
        state = cluster.wait(job, ("COMPLETED", "FAILED"))
        print(cluster.log(job))

It needs root and Debian's ``slurmctld slurmd slurm-client munge`` (installed
with apt-get when missing and we are root); otherwise ``unavailable()`` says
why and the pytest fixture skips. Everything lives in one temporary
directory: its own munge key and socket, its own slurm.conf (passed to the
client commands through SLURM_CONF), state, spool and logs. Two emulated
nodes, ``n1`` and ``n2``, run on this host (``NodeAddr=127.0.0.1``, one slurmd
each on its own port). Teardown stops only the daemons this object started,
by pid: other clusters or daemons on the machine are left alone.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
_BINARIES = {
    "munged": "munge",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "scontrol": "slurm-client",
    "srun": "slurm-client",
}
NODES = ("n1", "n2")
END_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
)


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _missing() -> list[str]:
    return sorted({pkg for binary, pkg in _BINARIES.items() if _which(binary) is None})


def unavailable(install: bool = True) -> str | None:
    """Why a cluster cannot be started here (None when it can); installs the packages if root."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "the local Slurm cluster needs Linux"
    missing = _missing()
    if os.geteuid() != 0:
        if missing:
            return f"needs root to install Debian's {' '.join(missing)} and to run slurmd (not root)"
        return "slurmd and slurmctld must run as root here (SlurmUser=root); not root"
    if missing and install:
        if _which("apt-get") is None:
            return f"Debian's {' '.join(missing)} are missing and there is no apt-get"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:  # the package lists may be missing: update once and retry
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            return f"could not install {' '.join(PACKAGES)}: {res.stderr.strip()[-300:]}"
        missing = _missing()
    if missing:
        return f"Debian's {' '.join(missing)} are not installed"
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """munged + slurmctld + two slurmd as children of this process, in a temporary directory.

    ``cpus`` is what each emulated node declares (more than the host has is
    fine: nothing is bound). ``cred_expire`` is how long a requeued job waits
    before it may start again (Slurm's default is 120 s). ``kill_wait`` is the
    time between SIGTERM and SIGKILL when a job or step is ended.
    """

    def __init__(self, cpus: int = 4, cred_expire: int = 10, kill_wait: int = 30, base: str | None = None):
        self.cpus = cpus
        self.cred_expire = cred_expire
        self.kill_wait = kill_wait
        self._base = base
        self.dir: Path | None = None
        self.conf: Path | None = None
        self.env: dict = {}
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._logs = []

    # -- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout: float = 60) -> None:
        why = unavailable()
        if why:
            raise SlurmError(why)
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-", dir=self._base))
        os.chmod(self.dir, 0o755)
        try:
            self._write_files()
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "-F",
                    "--force",
                    f"--socket={self.dir / 'munge' / 'munge.socket'}",
                    f"--key-file={self.dir / 'munge' / 'munge.key'}",
                    f"--pid-file={self.dir / 'munge' / 'munged.pid'}",
                    f"--seed-file={self.dir / 'munge' / 'munged.seed'}",
                    f"--log-file={self.dir / 'log' / 'munged.log'}",
                ],
            )
            self._wait_for(lambda: (self.dir / "munge" / "munge.socket").exists(), 20, "munged's socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for node in NODES:
                self._spawn(f"slurmd {node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self._wait_for(self._nodes_idle, timeout, "both nodes idle")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop this cluster's daemons (and only them), newest first, by pid."""
        for _name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for _name, proc in reversed(self._procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()

    def _spawn(self, name: str, argv: list) -> None:
        out = open(self.dir / "log" / f"{name.replace(' ', '-')}.stdout", "w")
        self._logs.append(out)
        # Own session: a Ctrl-C meant for pytest does not reach the daemons first.
        proc = subprocess.Popen(
            [str(a) for a in argv],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._procs.append((name, proc))
        time.sleep(0.2)
        if proc.poll() is not None:
            raise SlurmError(f"{name} exited at once ({proc.returncode}):\n{self.daemon_logs()}")

    def _wait_for(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise SlurmError(f"{name} died ({proc.returncode}) while waiting for {what}:\n{self.daemon_logs()}")
            if ok():
                return
            time.sleep(0.3)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.daemon_logs()}")

    def _nodes_idle(self) -> bool:
        res = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)
        return all(states.get(n) == "idle" for n in NODES)

    def _write_files(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir()
        os.chmod(d / "munge", 0o755)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        self.first_job_id = random.randrange(1000, 15000)  # jobs of two clusters get distinct ids (and ports)
        host = socket.gethostname().split(".")[0]
        lines = [
            "# Written by tests/slurm_cluster.py: a private two-node cluster on one host.",
            f"ClusterName=cifartest{os.getpid()}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CryptoType=crypto/munge",
            f"AuthInfo=socket={d / 'munge' / 'munge.socket'},cred_expire={self.cred_expire}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",  # a requeued job starts soon after its BeginTime
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "KillOnBadExit=1",
            "ReturnToService=2",
            "JobRequeue=1",
            f"FirstJobId={self.first_job_id}",
            f"KillWait={self.kill_wait}",
            "InactiveLimit=0",
            "MinJobAge=600",
            # This machine is slow and may be busy: generous timeouts.
            "MessageTimeout=60",
            "SlurmctldTimeout=300",
            "SlurmdTimeout=600",
            "BatchStartTimeout=120",
            "TCPTimeout=10",
        ]
        for node, port in zip(NODES, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf = d / "slurm.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)

    # -- client side ------------------------------------------------------------------------
    def client_env(self, **extra) -> dict:
        """An environment for client commands (sbatch, srun, ...) that talk to this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update({k: str(v) for k, v in extra.items()})
        env["SLURM_CONF"] = str(self.conf)
        return env

    def cmd(self, *args, env=None, check=True, timeout=120, cwd=None) -> subprocess.CompletedProcess:
        res = subprocess.run(
            [str(a) for a in args],
            env=env or self.client_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
        if check and res.returncode != 0:
            raise SlurmError(
                f"{' '.join(map(str, args))} exited {res.returncode}: {res.stdout.strip()} {res.stderr.strip()}"
            )
        return res

    def submit(self, *args, env=None, cwd=None) -> str:
        """``sbatch --parsable ARGS``; returns the job id."""
        res = self.cmd("sbatch", "--parsable", *args, env=env, cwd=cwd)
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (e.g. JobState, ExitCode, Restarts, StdOut, NodeList)."""
        res = self.cmd("scontrol", "show", "job", "-o", job_id, check=False)
        if res.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", res.stdout))

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: str, states=END_STATES, timeout: float = 600, poll: float = 1.0) -> dict:
        """Poll ``scontrol show job`` until the job is in one of ``states``; returns its record."""
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise SlurmError(
            f"job {job_id} not in {states} after {timeout:.0f} s (last: {info.get('JobState')})\n"
            f"--- job log\n{self.log(job_id)[-6000:]}"
        )

    def log(self, job_id: str, path: str | Path | None = None) -> str:
        """The job's output file (its StdOut as scontrol reports it, unless ``path`` is given)."""
        path = path or self.job(job_id).get("StdOut")
        try:
            return Path(path).read_text(errors="replace") if path else ""
        except FileNotFoundError:
            return ""

    def daemon_logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")) if self.dir else []:
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def node_addr(self, node: str) -> str:
        m = re.search(r"NodeAddr=(\S+)", self.cmd("scontrol", "show", "node", node).stdout)
        return m.group(1) if m else node


if __name__ == "__main__":  # a quick manual check: python tests/slurm_cluster.py
    import sys

    with SlurmCluster() as c:
        print("cluster up in", c.dir)
        print(c.cmd("sinfo").stdout)
        job = c.submit("--nodes=2", "--wrap", "srun hostname; srun printenv SLURM_NODEID", f"--output={c.dir}/j-%j.out")
        print(c.wait(job)["JobState"], c.log(job))
        if len(sys.argv) > 1:
            input("press enter to stop")
