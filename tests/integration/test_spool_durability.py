"""What Success promises, checked as a power cut would leave the disk: an acknowledged instance
is there, whole, under its name.

The spool lives on a loop-mounted image: ext4 with and without a journal, and xfs. Right after
:meth:`Spool.adopt` returns (when the receiver sends Success), the image file is copied: the
copy holds what the loop device was asked to write and nothing still in the page cache, which
is the disk after a power cut. The copy is then mended as at boot (``e2fsck``; xfs replays its
log when the copy is mounted) and the files are read back. On these file systems the file's
own ``fsync`` is the only flush for an instance going to an existing study folder
(``Spool.file_fsync_keeps_name``, spool/store.py); these tests are what that rests on.

Needs root (loop devices, mount), e2fsprogs and xfsprogs (``make install``).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from triage_node.spool import store
from triage_node.spool.store import Spool

pytestmark = pytest.mark.integration

_TOOLS = ("mkfs.ext4", "mkfs.xfs", "losetup", "mount", "umount", "e2fsck", "debugfs")
_KINDS = ("ext4", "ext4-nojournal", "xfs")


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class _Disk:
    """A file system image on a loop device, mounted; :meth:`power_cut` copies it as is."""

    def __init__(self, folder: Path, kind: str) -> None:
        self.folder, self.kind = folder, kind
        self.image = folder / "disk.img"
        self.mount_point = folder / "mnt"
        self.mount_point.mkdir()
        with self.image.open("wb") as f:
            f.truncate(320 << 20)  # mkfs.xfs wants 300 MB at least
        if kind == "xfs":
            _run("mkfs.xfs", "-q", "-f", str(self.image))
            options: tuple[str, ...] = ()
        else:
            _run("mkfs.ext4", "-q", "-F",
                 *(("-O", "^has_journal") if kind == "ext4-nojournal" else ()), str(self.image))
            # A journal otherwise commits on its own every 5 s, which could make an unflushed
            # change durable behind the test's back. (xfs pushes its log every 30 s.)
            options = ("-o", "commit=300") if kind == "ext4" else ()
        self.device = _run("losetup", "--find", "--show", str(self.image)).strip()
        try:
            _run("mount", "-t", kind.split("-")[0], *options, self.device, str(self.mount_point))
        except subprocess.CalledProcessError:
            _run("losetup", "--detach", self.device)
            raise
        self._cuts = 0

    def power_cut(self, paths: list[str]) -> dict[str, bytes | None]:
        """The files at ``paths`` (relative to the mount point) on the device as it is now,
        mended as at boot; None for a file that is not there."""
        self._cuts += 1
        copy = self.folder / f"cut{self._cuts}.img"
        shutil.copyfile(self.image, copy)
        try:
            read = self._read_xfs if self.kind == "xfs" else self._read_ext4
            return read(copy, paths)
        finally:
            copy.unlink()

    def _read_ext4(self, copy: Path, paths: list[str]) -> dict[str, bytes | None]:
        check = subprocess.run(["e2fsck", "-fy", str(copy)], capture_output=True, text=True)
        assert check.returncode in (0, 1), f"e2fsck could not mend the image:\n{check.stdout}"
        found: dict[str, bytes | None] = {}
        out = self.folder / "out"
        for path in paths:
            out.unlink(missing_ok=True)
            _run("debugfs", "-R", f"dump /{path} {out}", str(copy))
            found[path] = out.read_bytes() if out.exists() else None
        return found

    def _read_xfs(self, copy: Path, paths: list[str]) -> dict[str, bytes | None]:
        # Mounting replays the log, as at boot; the copy has the original's UUID (nouuid).
        mount_point = self.folder / "cut-mnt"
        mount_point.mkdir(exist_ok=True)
        device = _run("losetup", "--find", "--show", str(copy)).strip()
        try:
            _run("mount", "-t", "xfs", "-o", "nouuid", device, str(mount_point))
            try:
                return {path: (mount_point / path).read_bytes()
                        if (mount_point / path).exists() else None for path in paths}
            finally:
                _run("umount", str(mount_point))
        finally:
            _run("losetup", "--detach", device)

    def close(self) -> None:
        subprocess.run(["umount", str(self.mount_point)], check=False)
        subprocess.run(["losetup", "--detach", self.device], check=False)


@pytest.fixture
def disk_factory(tmp_path: Path) -> Iterator[Callable[[str], _Disk]]:
    if os.geteuid() != 0:
        pytest.skip("loop devices and mount need root")
    for tool in _TOOLS:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make install` (e2fsprogs, xfsprogs)")
    disks: list[_Disk] = []

    def make(kind: str) -> _Disk:
        folder = tmp_path / f"disk{len(disks)}"
        folder.mkdir()
        disks.append(_Disk(folder, kind))
        return disks[-1]
    yield make
    for disk in disks:
        disk.close()


def _receive(spool: Spool, study_key: str, uid: str, rng: random.Random) -> tuple[str, bytes]:
    """One 512 KiB instance as the receiver writes it (network-sized pieces, the early
    writeback, the last fragment), then adopted: the moment Success is sent.

    Before the adoption another association's instance is flushed, as happens all the time
    at several associations: with a journal, that commits the transaction which allocated
    this file's first blocks, and the rename falls in a later one. The file's ``fdatasync``
    would then not commit the rename; its ``fsync`` does."""
    data = rng.randbytes(524_288 + rng.randrange(1, 4096))
    incoming = spool.incoming()
    last = len(data) - 131_060
    for start in range(0, last, 65_536):
        incoming.write(data[start:min(start + 65_536, last)])
    incoming.ending()
    incoming.write(data[last:])
    incoming.complete()
    other = spool.root / "incoming" / "other-association.part"
    other.write_bytes(b"x" * 4096)
    with other.open("rb") as f:
        os.fsync(f.fileno())
    other.unlink()
    spooled = spool.adopt(incoming, study_key, uid)
    return f"spool/{spooled.relative_path}", data


@pytest.mark.parametrize("kind", _KINDS)
def test_an_acknowledged_instance_survives_a_power_cut(
        disk_factory: Callable[[str], _Disk], kind: str) -> None:
    disk = disk_factory(kind)
    spool = Spool(disk.mount_point / "spool")
    assert spool.file_fsync_keeps_name, f"{kind}: the folder fsync is left out, tested here"
    os.sync()  # the spool's folders exist, as on a node that has been running
    rng = random.Random(4)
    kept = dict([_receive(spool, "study1", "1.2.3.1", rng)])  # a new study folder
    assert disk.power_cut(list(kept)) == kept
    for number in range(2, 6):  # into the existing folder: the file's fsync is the only flush
        kept.update([_receive(spool, "study1", f"1.2.3.{number}", rng)])
        found = disk.power_cut(list(kept))
        lost = [path for path, data in kept.items() if found[path] != data]
        assert not lost, f"acknowledged instance(s) lost or cut short: {lost}"


@pytest.mark.parametrize("kind", _KINDS)
def test_the_power_cut_loses_a_rename_nobody_flushed(
        disk_factory: Callable[[str], _Disk], kind: str) -> None:
    """The check above can fail: a file written and renamed into a study folder without any
    flush is not on the copied device."""
    disk = disk_factory(kind)
    folder = disk.mount_point / "spool" / "studies" / "study1"
    folder.mkdir(parents=True)
    (disk.mount_point / "spool" / "incoming").mkdir()
    os.sync()
    part = disk.mount_point / "spool" / "incoming" / "x.part"
    part.write_bytes(random.Random(5).randbytes(524_288))
    os.replace(part, folder / "x.dcm")
    path = "spool/studies/study1/x.dcm"
    assert disk.power_cut([path]) == {path: None}


def test_other_file_systems_keep_the_folder_fsync(
        tmp_path: Path, disk_factory: Callable[[str], _Disk],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On tmpfs (any file system but ext4 and xfs) each adopted file's folder is fsynced; on xfs
    only a new study folder and its parent are."""
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    _run("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(tmpfs))
    try:
        synced: list[str] = []
        real_fsync_dir = store._fsync_dir

        def fsync_dir(path: str | Path) -> None:
            synced.append(os.fspath(path))
            real_fsync_dir(path)
        monkeypatch.setattr(store, "_fsync_dir", fsync_dir)
        rng = random.Random(6)
        on_tmpfs = Spool(tmpfs / "spool")
        assert not on_tmpfs.file_fsync_keeps_name
        _receive(on_tmpfs, "study1", "1.2.3.1", rng)
        _receive(on_tmpfs, "study1", "1.2.3.2", rng)
        folder = f"{tmpfs}/spool/studies/study1"
        assert synced == [folder, f"{tmpfs}/spool/studies", folder]
        on_xfs = Spool(disk_factory("xfs").mount_point / "spool")
        synced.clear()
        _receive(on_xfs, "study1", "1.2.3.1", rng)
        _receive(on_xfs, "study1", "1.2.3.2", rng)
        assert synced == [f"{on_xfs.root}/studies/study1", f"{on_xfs.root}/studies"]
    finally:
        _run("umount", str(tmpfs))


def test_reads_the_file_system_type_of_the_deepest_mount(tmp_path: Path) -> None:
    mountinfo = (
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "40 22 0:33 / /var/lib/spool\\040disk rw - xfs /dev/vdb rw\n"
        "41 40 0:34 / /var/lib/spool\\040disk/tmp rw - tmpfs tmpfs rw\n"
        "42 22 0:35 / /var/lib/spool rw - btrfs /dev/vdc rw\n"
    )
    source = tmp_path / "mountinfo"
    source.write_text(mountinfo)
    fstype = store._mount_fstype
    assert fstype("/var/lib/spool disk/node", source) == "xfs"
    assert fstype("/var/lib/spool disk/tmp/x", source) == "tmpfs"
    assert fstype("/var/lib/spool/x", source) == "btrfs"
    assert fstype("/var/lib/spoolx", source) == "ext4"  # a prefix of a name is not a mount
    assert fstype("/", source) == "ext4"
    assert fstype("/x", tmp_path / "missing") == ""
