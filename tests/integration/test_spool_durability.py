"""What Success promises, checked as a power cut would leave the disk: an acknowledged instance
is there, whole, under its name.

The spool lives on a loop-mounted ext4 image, with and without a journal. Right after
:meth:`Spool.adopt` returns (when the receiver sends Success), the image file is copied: the
copy holds what the loop device was asked to write and nothing still in the page cache, which
is the disk after a power cut. ``e2fsck`` then does what a reboot would (replays the journal,
mends counts) and ``debugfs`` reads the files out. On ext4 the file's own ``fsync`` is the
only flush for an instance going to an existing study folder (``Spool.file_fsync_keeps_name``,
spool/store.py); these tests are what that rests on.

Needs root (loop devices, mount) and e2fsprogs (``make install``).
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

_TOOLS = ("mkfs.ext4", "losetup", "mount", "umount", "e2fsck", "debugfs")


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class _Disk:
    """An ext4 image on a loop device, mounted; :meth:`power_cut` copies the device as is."""

    def __init__(self, folder: Path, journal: bool) -> None:
        self.folder = folder
        self.image = folder / "disk.img"
        self.mount_point = folder / "mnt"
        self.mount_point.mkdir()
        with self.image.open("wb") as f:
            f.truncate(128 << 20)
        _run("mkfs.ext4", "-q", "-F", *(() if journal else ("-O", "^has_journal")),
             str(self.image))
        self.device = _run("losetup", "--find", "--show", str(self.image)).strip()
        # A journal otherwise commits on its own every 5 s, which could make an unflushed
        # change durable behind the test's back.
        options = ("-o", "commit=300") if journal else ()
        try:
            _run("mount", "-t", "ext4", *options, self.device, str(self.mount_point))
        except subprocess.CalledProcessError:
            _run("losetup", "--detach", self.device)
            raise
        self._cuts = 0

    def power_cut(self) -> Callable[[str], bytes | None]:
        """The device as it is now, mended as at boot; returns a reader of its files."""
        self._cuts += 1
        copy = self.folder / f"cut{self._cuts}.img"
        shutil.copyfile(self.image, copy)
        check = subprocess.run(["e2fsck", "-fy", str(copy)], capture_output=True, text=True)
        assert check.returncode in (0, 1), f"e2fsck could not mend the image:\n{check.stdout}"

        def read(path: str) -> bytes | None:
            out = self.folder / "out"
            out.unlink(missing_ok=True)
            _run("debugfs", "-R", f"dump /{path} {out}", str(copy))
            return out.read_bytes() if out.exists() else None
        return read

    def close(self) -> None:
        subprocess.run(["umount", str(self.mount_point)], check=False)
        subprocess.run(["losetup", "--detach", self.device], check=False)


@pytest.fixture
def disk_factory(tmp_path: Path) -> Iterator[Callable[[bool], _Disk]]:
    if os.geteuid() != 0:
        pytest.skip("loop devices and mount need root")
    for tool in _TOOLS:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make install` (e2fsprogs, mount)")
    disks: list[_Disk] = []

    def make(journal: bool) -> _Disk:
        folder = tmp_path / f"disk{len(disks)}"
        folder.mkdir()
        disks.append(_Disk(folder, journal))
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


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
def test_an_acknowledged_instance_survives_a_power_cut(
        disk_factory: Callable[[bool], _Disk], journal: bool) -> None:
    disk = disk_factory(journal)
    spool = Spool(disk.mount_point / "spool")
    assert spool.file_fsync_keeps_name, "ext4: the folder fsync is left out, which is tested here"
    os.sync()  # the spool's folders exist, as on a node that has been running
    rng = random.Random(4)
    first = _receive(spool, "study1", "1.2.3.1", rng)  # a new study folder
    read = disk.power_cut()
    assert read(first[0]) == first[1]
    kept = [first]
    for number in range(2, 6):  # into the existing folder: the file's fsync is the only flush
        kept.append(_receive(spool, "study1", f"1.2.3.{number}", rng))
        read = disk.power_cut()
        for path, data in kept:
            assert read(path) == data, f"acknowledged instance {path} lost"


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
def test_the_power_cut_loses_a_rename_nobody_flushed(
        disk_factory: Callable[[bool], _Disk], journal: bool) -> None:
    """The check above can fail: a file written and renamed into a study folder without any
    flush is not on the copied device."""
    disk = disk_factory(journal)
    folder = disk.mount_point / "spool" / "studies" / "study1"
    folder.mkdir(parents=True)
    (disk.mount_point / "spool" / "incoming").mkdir()
    os.sync()
    part = disk.mount_point / "spool" / "incoming" / "x.part"
    part.write_bytes(random.Random(5).randbytes(524_288))
    os.replace(part, folder / "x.dcm")
    read = disk.power_cut()
    assert read("spool/studies/study1/x.dcm") is None


def test_other_file_systems_keep_the_folder_fsync(
        tmp_path: Path, disk_factory: Callable[[bool], _Disk],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On tmpfs (any file system but ext4) each adopted file's folder is fsynced; on ext4
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
        on_ext4 = Spool(disk_factory(False).mount_point / "spool")
        synced.clear()
        _receive(on_ext4, "study1", "1.2.3.1", rng)
        _receive(on_ext4, "study1", "1.2.3.2", rng)
        assert synced == [f"{on_ext4.root}/studies/study1", f"{on_ext4.root}/studies"]
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
