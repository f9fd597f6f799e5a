"""Regenerate the HTJ2K test instances in this folder (PS3.5 A.4.11, HTJ2K transfer syntaxes).

pydicom's offline test data (pydicom-data 1.0) has no HTJ2K file and no Python package on the
index encodes HTJ2K, so the three instances here were made once from pydicom's ``MR_small.dcm``
(64×64, signed 16-bit) with OpenJPH's ``ojph_compress`` (Debian ``openjph-tools``) and are
committed. Decoding them is done by pylibjpeg-openjpeg, which the node uses at run time.

    python tests/data/htj2k/make_htj2k.py     # needs ojph_compress on PATH
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import UID

HERE = Path(__file__).resolve().parent

# (file name, transfer syntax, ojph_compress options)
VARIANTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("MR_small_htj2k_lossless.dcm", "1.2.840.10008.1.2.4.201",
     ("-reversible", "true", "-prog_order", "LRCP")),
    ("MR_small_htj2k_lossless_rpcl.dcm", "1.2.840.10008.1.2.4.202",
     ("-reversible", "true", "-prog_order", "RPCL")),
    ("MR_small_htj2k_lossy.dcm", "1.2.840.10008.1.2.4.203",
     ("-reversible", "false", "-qstep", "0.0005")),
)


def main() -> None:
    source = get_testdata_file("MR_small.dcm", download=False)
    assert source is not None
    reference = pydicom.dcmread(source)
    pixels = reference.pixel_array
    rows, cols = pixels.shape
    signed = int(reference.PixelRepresentation) == 1
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "in.yuv"
        raw.write_bytes(pixels.astype("<i2" if signed else "<u2").tobytes())
        for name, syntax, options in VARIANTS:
            out = Path(tmp) / f"{name}.j2c"
            subprocess.run(
                ["ojph_compress", "-i", str(raw), "-o", str(out),
                 "-dims", f"{{{cols},{rows}}}", "-num_comps", "1",
                 "-signed", "true" if signed else "false",
                 "-bit_depth", str(int(reference.BitsStored)), "-downsamp", "{1,1}",
                 *options],
                check=True, capture_output=True,
            )
            ds = pydicom.dcmread(source)
            ds.file_meta.TransferSyntaxUID = UID(syntax)
            ds.PixelData = encapsulate([out.read_bytes()])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            if syntax.endswith(".203"):
                ds.LossyImageCompression = "01"
            ds.save_as(HERE / name, enforce_file_format=True)
            check = pydicom.dcmread(HERE / name).pixel_array.astype(np.int64)
            print(name, syntax, "max |diff|", int(np.abs(check - pixels).max()))


if __name__ == "__main__":
    main()
