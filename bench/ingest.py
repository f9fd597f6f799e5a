"""Receive speed: the same 500-instance 512×512 CT into DCMTK ``storescp``, Orthanc and triage-node.

One run, same machine, same sender (DCMTK ``storescu``, ``TCP_NODELAY=1``), same data:

* ``storescp``   — DCMTK's store SCP writing files (``--fork`` so it takes parallel associations);
* ``orthanc``    — a throwaway Debian Orthanc (index + storage on the same disk);
* ``triage-node``— ``triage-node serve`` with the demo configuration: bytes fsynced and renamed,
  indexed in SQLite, before each Success, with the default number of receiving processes (one
  per core, at most 4); ``triage-node/1p`` the same with one receiving process
  (``dicom.receiver_processes: 1``).

Orthanc flushes each instance to disk (``SyncStorageArea``, on by default since 1.7.4), as
triage-node does before its Success (PS3.4 B.2.2); DCMTK ``storescp`` does not flush at all,
so it is the ceiling of the machine's network and page cache, not a like-for-like receiver.

Each receiver gets the study over 1 association, then over 4 (the files split in 4 parts, one
``storescu`` per part, started together). Figures are instances/s and MB/s from the first
association request to the last response; the ratios to Orthanc and storescp are the
medians over the repeats of the ratio within each repeat (receivers take turns, so the runs
compared are seconds apart), printed with their range over the repeats.

Each run starts a fresh receiver (process and output folder). The outputs of earlier runs
are moved aside and emptied, and deleted only when the bench ends: on ext4 without a journal,
files deleted in the last minute or so slow the creation of new ones (:func:`set_aside`), and
the bench's own clean-up would otherwise slow whichever receiver it measures next. For the
same reason the bench first waits, up to 7 minutes, until creating a file is cheap again
after whatever ran before it, and prints that cost.

First it measures what durability costs on this disk: the median time the spool's own
code takes to rename a new file into its study folder and flush it (and the folder, where
the file system needs that: not ext4 or xfs), as triage-node does before each Success, and
the ceiling that puts on one association; and what reading each header costs, on the
receiver's fast path and with pydicom.

Then 2,000 instances (4 studies) go to triage-node over 4 associations while its resident
memory is sampled: the peak (sum over the node's processes) must stay flat, not grow with the
number of instances received.

Run: ``python -m bench.ingest`` (about 8 minutes, and up to 7 more when it waits for file
creation to be cheap). ``--instances`` changes the study size,
``--repeats`` the number of runs each figure is the median of (default 5: on a shared
machine one run can be 25 % off the next).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploy.demo.node import NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc, free_port, wait_for_port
from deploy.demo.senders import dcmtk, dcmtk_env
from trainers.phantoms.dicom import write_ct_series
from triage_node.config.models import default_receiver_processes
from triage_node.spool.index import read_header, read_header_with_pydicom
from triage_node.spool.store import Spool

ENV = dcmtk_env()


def make_study(folder: Path, instances: int, seed: int) -> list[Path]:
    """A 512×512 CT series of ``instances`` slices with noise, as a scanner would send it."""
    rng = np.random.default_rng(seed)
    base = rng.normal(40.0, 20.0, size=(512, 512)).astype(np.float32)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) ** 2 + (xx - 256) ** 2) < 220**2
    hu = np.empty((instances, 512, 512), dtype=np.float32)
    for z in range(instances):
        hu[z] = np.where(body, base + rng.normal(0.0, 8.0, size=(512, 512)), -1000.0)
    return write_ct_series(
        hu, (1.0, 0.7, 0.7), folder, patient_name="BENCH^INGEST", patient_id=f"BENCH{seed}",
        accession_number=f"BENCHACC{seed}", study_description="CT BENCH",
        series_description="Axial 1mm", body_part_examined="CHEST")


def split(files: list[Path], parts: int, root: Path) -> list[Path]:
    """Hard-link the files into ``parts`` folders (one per association)."""
    folders = []
    for p in range(parts):
        folder = root / f"part{p}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for f in files[p::parts]:
            os.link(f, folder / f.name)
        folders.append(folder)
    return folders


def send(folders: list[Path], port: int, called_aet: str) -> float:
    """One ``storescu`` per folder, all at once; returns the wall time until all finished."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen([dcmtk("storescu"), "-aet", "STORESCU", "-aec", called_aet, "+sd", "+r",
                          "127.0.0.1", str(port), str(folder)],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for folder in folders
    ]
    errors = [p.communicate()[1].decode(errors="replace") for p in procs]
    elapsed = time.perf_counter() - started
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu exited {proc.returncode}: {err[-1500:]}")
    return elapsed


@dataclass
class Receiver:
    name: str
    port: int
    called_aet: str
    reset: Callable[[], None]
    stop: Callable[[], None]
    pids: Callable[[], list[int]]


def set_aside(folder: Path) -> None:
    """Move a receiver's output out of the way and empty its files; they are deleted when
    the bench ends.

    Emptied (their pages and blocks freed, what storescp never flushed dropped unwritten, as
    deleting them did), not deleted: on ext4 without a journal (this machine's disk) a new
    file does not take an inode freed in the last minute (six while its block is not yet
    written back), and finding a free one walks past every such inode of the folder's block
    group, one lookup each. After the 500 files of the last run are deleted, each file the
    next receiver creates costs 0.1-0.5 ms instead of about 0.02 (``perf``:
    ``recently_deleted``, ``find_get_block_common``). A PACS forwarding studies does not
    delete thousands of files a few seconds before each study; the bench's own clean-up
    should not slow the receiver it measures next.
    """
    if not folder.exists():
        return
    kept = folder.parent / "set-aside"
    kept.mkdir(exist_ok=True)
    moved = kept / f"{folder.name}-{time.monotonic_ns()}"
    folder.rename(moved)
    for root, _dirs, names in os.walk(moved):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.truncate(path, 0)


def start_storescp(work: Path) -> Receiver:
    out = work / "storescp-out"
    port = free_port()
    state: dict[str, subprocess.Popen[bytes]] = {}

    def start() -> None:
        out.mkdir(parents=True)
        state["proc"] = subprocess.Popen(
            [dcmtk("storescp"), "--fork", "-od", str(out), "-aet", "STORESCP",
             "--max-pdu", "131072", str(port)],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, state["proc"], name="storescp", timeout=30)

    def stop() -> None:
        state["proc"].terminate()
        state["proc"].wait(timeout=10)

    def reset() -> None:
        stop()
        set_aside(out)
        start()

    start()
    # With --fork each association is a child: count them too (alive, exited or reaped).
    return Receiver("storescp", port, "STORESCP", reset, stop,
                    lambda: _process_tree(state["proc"].pid))


def start_orthanc(work: Path) -> tuple[Receiver, LocalOrthanc]:
    orthanc = LocalOrthanc(work / "orthanc-bench").start()

    def reset() -> None:
        # A new Orthanc (same ports) on a new storage folder and index, rather than deleting
        # the studies: see set_aside.
        orthanc.stop()
        set_aside(orthanc.workdir)
        orthanc.start()

    return (Receiver("orthanc", orthanc.dicom_port, orthanc.aet, reset, orthanc.stop,
                     lambda: [] if orthanc.pid is None else [orthanc.pid]), orthanc)


def start_node(work: Path, orthanc: LocalOrthanc, name: str = "node",
               processes: int | None = None) -> Receiver:
    # Completion far in the future: this measures receiving, not processing.
    extra = {"dicom__receiver_processes": processes} if processes else {}
    config = write_node_config(work / f"{name}-conf", assembly__study_quiet_seconds=3600,
                               **extra)
    node = NodeProcess(work / name, orthanc, config=config).start()
    state = {"node": node}

    def reset() -> None:
        state["node"].stop()
        set_aside(work / name)
        fresh = NodeProcess(work / name, orthanc, config=config,
                            dicom_port=state["node"].dicom_port).start()
        state["node"] = fresh

    def pids() -> list[int]:
        return _process_tree(state["node"].pid)

    label = f"triage-node/{processes}p" if processes else "triage-node"
    return Receiver(label, node.dicom_port, "TRIAGE", reset,
                    lambda: state["node"].stop(), pids)


def _process_tree(pid: int | None) -> list[int]:
    if pid is None:
        return []
    found = [pid]
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.extend(_process_tree(int(child.name)))
    return found


def flush_costs(folder: Path, count: int = 100) -> tuple[float, bool]:
    """Median seconds triage-node takes to make one acknowledged 512 KiB instance durable on
    the file system of ``folder``, through the spool's own code: the file received into
    ``incoming/`` is renamed into its study folder and flushed (``Spool.adopt``: the file's
    ``fsync`` where that also makes its new name durable, ext4 and xfs; elsewhere
    ``fdatasync`` and the folder's ``fsync``). Also whether the folder needs that flush of
    its own."""
    spool = Spool(folder)
    data = os.urandom(524_288)
    timings = []
    try:
        for i in range(count + 1):
            incoming = spool.incoming()
            incoming.write(data)
            incoming.complete()
            t0 = time.perf_counter()
            spool.adopt(incoming, "study", f"1.2.826.0.1.3680043.8.498.{i + 1}")
            if i:  # the first one makes the study folder
                timings.append(time.perf_counter() - t0)
    finally:
        set_aside(folder)  # not deleted yet: see set_aside
    return float(np.median(timings)), not spool.file_fsync_keeps_name


def create_cost(folder: Path, count: int = 200) -> float:
    """Median seconds to create one empty file in a new folder (the files are set aside,
    not deleted: see :func:`set_aside`)."""
    folder.mkdir(parents=True)
    timings = []
    for i in range(count):
        t0 = time.perf_counter()
        os.close(os.open(folder / f"{i}.part", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640))
        timings.append(time.perf_counter() - t0)
    set_aside(folder)
    return float(np.median(timings))


def settle(work: Path, limit_s: float = 60e-6, wait_s: float = 420.0) -> float:
    """Wait until creating a file costs less than ``limit_s`` (at most ``wait_s``): inodes
    freed by whatever ran before the bench slow every receiver's file creation until they
    age (see :func:`set_aside`). Returns the last median measured."""
    deadline = time.monotonic() + wait_s
    cost = create_cost(work / "create-probe")
    while cost >= limit_s and time.monotonic() < deadline:
        print(f"file creation costs {cost * 1e6:.0f} µs (files deleted shortly before the "
              f"bench); waiting for it to fall below {limit_s * 1e6:.0f} µs…", flush=True)
        time.sleep(15)
        cost = create_cost(work / "create-probe")
    return cost


def header_costs(files: list[Path]) -> tuple[float, float]:
    """Median seconds to read one instance's header and index attributes, as the receiver
    does before each Success: the fast path, and pydicom's path it falls back to."""
    datas = [f.read_bytes() for f in files]
    timings: dict[str, list[float]] = {"fast": [], "pydicom": []}
    for data in datas:
        for name, read in (("fast", read_header), ("pydicom", read_header_with_pydicom)):
            t0 = time.perf_counter()
            read(data)
            timings[name].append(time.perf_counter() - t0)
    return float(np.median(timings["fast"])), float(np.median(timings["pydicom"]))


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes used so far, with their waited-for children
    (``storescp --fork`` serves each association in a child)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def sender_cpu() -> float:
    """CPU time of this process's finished children: the ``storescu`` senders."""
    times = os.times()
    return times.children_user + times.children_system


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--only", choices=["storescp", "orthanc", "triage-node"], nargs="*")
    parser.add_argument("--memory-instances", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5,
                        help="measure each receiver and association count this many times "
                             "(in turns) and report the median (default: 5)")
    parser.add_argument("--receiver-processes", type=int, nargs="*", default=[1],
                        help="also run triage-node with these dicom.receiver_processes "
                             "(default: 1, beside the default of one per core)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        print(f"writing a {args.instances}-instance 512×512 CT…", flush=True)
        files = make_study(work / "study", args.instances, seed=1)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        create_s = settle(work)
        print(f"file creation: {create_s * 1e6:.0f} µs per new file (median of 200)", flush=True)
        flush_s, folder_flushed = flush_costs(work / "flush")
        print(f"storage: a new 512 KiB file renamed into its study folder and made durable "
              f"(spool/store.py, Spool.adopt) in {flush_s * 1000:.2f} ms (median of 100); "
              f"its folder {'is' if folder_flushed else 'needs no'} fsync"
              f"{'ed as well' if folder_flushed else ' of its own'} on this file system "
              f"→ durability alone caps one association at {1 / flush_s:.0f} inst/s",
              flush=True)
        print(f"triage-node's default here: {default_receiver_processes()} receiving "
              f"process(es)", flush=True)
        fast_s, pydicom_s = header_costs(files)
        print(f"header: read from the bytes (spool/header_scan.py) {fast_s * 1000:.3f} ms, "
              f"with pydicom {pydicom_s * 1000:.3f} ms per instance (medians over the study)",
              flush=True)
        one = [work / "study"]
        four = split(files, 4, work / "split")
        receivers: list[Receiver] = []
        orthanc: LocalOrthanc | None = None
        try:
            receivers.append(start_storescp(work))
            orthanc_receiver, orthanc = start_orthanc(work)
            receivers.append(orthanc_receiver)
            receivers.append(start_node(work, orthanc))
            for n in args.receiver_processes:
                receivers.append(start_node(work, orthanc, f"node-{n}p", processes=n))
            # Each measurement is repeated, the receivers taking turns, and the median is
            # reported: this shared machine's speed drifts by ±20 % from one minute to the next.
            runs: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
            measured = [r for r in receivers
                        if not args.only or r.name.split("/")[0] in args.only]
            for repeat in range(args.repeats):
                for label, folders in ((1, one), (4, four)):
                    for receiver in measured:
                        cpu_before, sender_before = cpu_seconds(receiver.pids()), sender_cpu()
                        elapsed = send(folders, receiver.port, receiver.called_aet)
                        cpu = cpu_seconds(receiver.pids()) - cpu_before
                        runs.setdefault((receiver.name, label), []).append(
                            (elapsed, cpu, sender_cpu() - sender_before))
                        # At once (the stopped receiver's own CPU then counts among this
                        # process's children, after the sender's was taken), so that what
                        # storescp never flushed is dropped before the next receiver runs,
                        # not written back during its run.
                        receiver.reset()
                        print(f"  [{repeat + 1}/{args.repeats}] {receiver.name:<15} {label} "
                              f"assoc: {elapsed:6.2f} s  {args.instances / elapsed:7.1f} inst/s",
                              flush=True)
            results = {key: float(np.median([r[0] for r in rs])) for key, rs in runs.items()}

            def ratio(name: str, reference: str, label: int) -> str:
                """Median over the repeats of the speed ratio within each repeat, and its
                range: the runs compared follow each other within seconds, so a slow minute
                of the machine slows both (a ratio of medians would mix minutes)."""
                ours, theirs = runs[(name, label)], runs.get((reference, label))
                if not theirs:
                    return f"{'-':>4} {'':9}"
                ratios = [t[0] / o[0] for o, t in zip(ours, theirs, strict=True)]
                return (f"{float(np.median(ratios)):4.2f} "
                        f"{min(ratios):4.2f}–{max(ratios):<4.2f}")
            print(f"\n{args.instances} instances, {megabytes:.0f} MB, storescu → receiver, "
                  f"loopback, {os.cpu_count()} cores; median of {args.repeats} runs (range); "
                  f"CPU: ms per instance, receiver and sender")
            print(f"{'receiver':<15} {'assoc':>5} {'inst/s':>8} {'range':>11} {'MB/s':>7} "
                  f"{'× orthanc (range)':>19} {'× storescp (range)':>19} {'CPU rx':>7} "
                  f"{'CPU tx':>7}")
            for (name, label), elapsed in results.items():
                rates = sorted(args.instances / r[0] for r in runs[(name, label)])
                cpu_rx = 1000 * float(np.median([r[1] for r in runs[(name, label)]]))
                cpu_tx = 1000 * float(np.median([r[2] for r in runs[(name, label)]]))
                print(f"{name:<15} {label:>5} {args.instances / elapsed:8.1f} "
                      f"{rates[0]:5.0f}–{rates[-1]:<5.0f} {megabytes / elapsed:7.1f} "
                      f"{ratio(name, 'orthanc', label):>19} "
                      f"{ratio(name, 'storescp', label):>19} "
                      f"{cpu_rx / args.instances:7.2f} {cpu_tx / args.instances:7.2f}")
            if args.memory_instances and (not args.only or "triage-node" in args.only):
                node = receivers[2]  # a fresh node: every run above ends with a reset
                studies = max(1, args.memory_instances // args.instances)
                folders = []
                for s in range(studies):
                    folder = work / f"mem{s}"
                    make_study(folder, args.instances, seed=100 + s)
                    folders.append(folder)
                samples: list[float] = []
                done = threading.Event()

                def sample() -> None:
                    while not done.is_set():
                        samples.append(rss_mb(node.pids()))
                        time.sleep(0.2)

                sampler = threading.Thread(target=sample, daemon=True)
                before = rss_mb(node.pids())
                sampler.start()
                elapsed = send(folders, node.port, node.called_aet)
                done.set()
                sampler.join()
                count = studies * args.instances
                quarter = samples[: max(1, len(samples) // 4)]
                print(f"\nmemory: {count} instances over {studies} associations in "
                      f"{elapsed:.1f} s ({count / elapsed:.0f} inst/s); triage-node RSS "
                      f"before {before:.0f} MB, peak in first quarter {max(quarter):.0f} MB, "
                      f"peak overall {max(samples):.0f} MB, at end {samples[-1]:.0f} MB")
        finally:
            for receiver in receivers:
                if receiver.name != "orthanc":
                    receiver.stop()
            if orthanc is not None:
                orthanc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
