"""Read another process's CPU time and memory from Linux ``/proc`` (see proc(5)).

Also stops the processes the benchmark started.

Linux only. Reading these files costs the reading process, not the one measured.
"""

import contextlib
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_KIB_PER_MIB = 1024


@dataclass(frozen=True)
class CpuSample:
    """The CPU seconds a process had used at one moment.

    Attributes:
        cpu_s: user plus system time of every thread of the process, in seconds.
        wall_s: ``time.monotonic()`` when ``cpu_s`` was read.
    """

    cpu_s: float
    wall_s: float

    def percent_since(self, earlier: "CpuSample") -> float:
        """Return the CPU used between ``earlier`` and this sample, in percent of one core."""
        elapsed = self.wall_s - earlier.wall_s
        if elapsed <= 0:
            return 0.0
        return (self.cpu_s - earlier.cpu_s) / elapsed * 100


@dataclass(frozen=True)
class Memory:
    """The memory figures of ``/proc/PID/status``.

    Attributes:
        rss_kib: resident set size now (``VmRSS``), in KiB.
        peak_rss_kib: the largest resident set size since the process started (``VmHWM``), in KiB.
        threads: the number of threads now.
    """

    rss_kib: int
    peak_rss_kib: int
    threads: int

    @property
    def rss_mib(self) -> float:
        """Resident set size now, in MiB."""
        return self.rss_kib / _KIB_PER_MIB

    @property
    def peak_rss_mib(self) -> float:
        """Peak resident set size, in MiB."""
        return self.peak_rss_kib / _KIB_PER_MIB


@dataclass(frozen=True)
class Machine:
    """The machine that the figures were measured on.

    Attributes:
        cpu_model: the CPU's name from /proc/cpuinfo.
        cores: the number of logical CPUs.
        python: the Python implementation and version running this script.
        load_average: the 1-minute load average when this was read, which
            shows other work competing for the CPUs.
    """

    cpu_model: str
    cores: int
    python: str
    load_average: float


def sample_cpu(pid: int) -> CpuSample:
    """Read the CPU time that every thread of ``pid`` has used so far.

    The kernel counts it in clock ticks (``SC_CLK_TCK``, usually 100 a second),
    so over 60 s a difference below 0.02 % of one core is not resolved.

    Raises:
        ProcessLookupError: the process has exited.
    """
    wall_s = time.monotonic()
    text = _read_proc(pid, "stat")

    # Field 2 (comm) is in parentheses and may itself contain spaces or ')',
    # so the numeric fields start after the last ')'. There, index 0 is field 3
    # (state), which puts utime (field 14) and stime (field 15) at 11 and 12.
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return CpuSample(ticks / _CLOCK_TICKS_PER_S, wall_s)


def read_memory(pid: int) -> Memory:
    """Read the current and peak resident set size and the thread count of ``pid``.

    Raises:
        ProcessLookupError: the process has exited.
    """
    values: dict[str, str] = {}
    for line in _read_proc(pid, "status").splitlines():
        key, _, value = line.partition(":")
        values[key] = value.strip()

    # VmRSS and VmHWM are "<number> kB", where kB means KiB (proc(5)).
    return Memory(
        rss_kib=int(values["VmRSS"].split()[0]),
        peak_rss_kib=int(values["VmHWM"].split()[0]),
        threads=int(values["Threads"]),
    )


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop a process started by this script, by its pid: SIGTERM, then SIGKILL after ``timeout``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def describe_machine() -> Machine:
    """Return the CPU model, the number of logical CPUs, the Python version and the load."""
    return Machine(
        cpu_model=_cpu_model(),
        cores=os.cpu_count() or 1,
        python=f"{platform.python_implementation()} {sys.version.split()[0]}",
        load_average=round(os.getloadavg()[0], 2),
    )


def _cpu_model() -> str:
    # x86 kernels name the CPU in "model name", but many ARM kernels (Raspberry
    # Pi) use "Model" or "Hardware" instead.
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.machine()

    found: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        found.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model", "Hardware"):
        if found.get(key):
            return found[key]
    return platform.machine()


def _read_proc(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} has exited") from None
