"""py-spy profile of the supervisor, the fork-server and the relay while N daemons start.

Run:  python bench/profile_start.py [--count 500] [--spawn fork-server] [--seconds 30]

Starts a swarm exactly as ``swarm_bench.py`` does (own HOME, own relay, observer),
attaches ``py-spy record --nonblocking`` to the supervisor at once, to the relay,
and to the fork-server as soon as it exists, and prints for each process the
functions with the most samples, inclusive ("where the time goes below here") and
exclusive ("who burns it"). py-spy is installed into the benchmark's venv.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from supervisord_peer import ensure_venv  # noqa: E402
from swarm_bench import Run, byte_compile_package, descendants  # noqa: E402


def spy(pyspy: Path, pid: int, out: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([str(pyspy), "record", "--nonblocking", "--rate", "200", "--format", "raw",
                             "--pid", str(pid), "--duration", str(int(seconds)), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def find_forkserver(sup: int, timeout: float = 5.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(sup):
            try:
                if b"fork-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        time.sleep(0.005)
    return None


def summarise(path: Path, top: int = 18) -> str:
    """Top inclusive and exclusive frames of a py-spy raw (collapsed) file."""
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")") for f in stack.split(";")[1:]]
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            exclusive[frames[-1]] += n
    lines = [f"{path.stem}: {total} samples"]
    lines += ["  inclusive:"] + [f"    {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    lines += ["  exclusive:"] + [f"    {100 * c / total:5.1f}%  {f}" for f, c in exclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--spawn", default="fork-server")
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    pyspy = ensure_venv(packages=("supervisor", "py-spy")) / "py-spy"
    print(byte_compile_package())
    out = Path(tempfile.mkdtemp(prefix="profile-start-"))
    run = Run(args.spawn, args.count, out)
    spies = []
    try:
        from swarm_bench import Observer, Relay
        from tests.swarmlib import Swarm
        home = out / "home"
        run.relay = Relay(out)
        run.observer = Observer(run.relay.url).start()
        spies.append(spy(pyspy, run.relay.pid, out / "relay.txt", args.seconds))
        run.swarm = Swarm(home, run.config())
        run.t_launch = time.monotonic()
        run.swarm.start("--count", str(args.count), wait_ready=False)
        spies.append(spy(pyspy, run.sup_pid, out / "supervisor.txt", args.seconds))
        forkserver = find_forkserver(run.sup_pid) if args.spawn == "fork-server" else None
        if forkserver:
            spies.append(spy(pyspy, forkserver, out / "forkserver.txt", args.seconds))
        try:
            ready = run.wait_heartbeats(args.count, run.t_launch, timeout=args.seconds)
            print(f"ready: {args.count} heartbeating after {ready:.2f} s (profiled, slower than unprofiled)")
        except TimeoutError as exc:
            print(f"not ready: {exc}")
        for proc in spies:
            proc.wait(args.seconds + 30)
    finally:
        run.stop()
    for name in ("supervisor", "forkserver", "relay"):
        path = out / f"{name}.txt"
        if path.exists():
            print(summarise(path))
    print(f"raw profiles in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
