"""Association rejections as a DICOM requestor sees them, through DCMTK ``echoscu``.

pynetdicom's requestor is not used for these checks: when the A-ASSOCIATE-RJ arrives (and the
acceptor closes) before its calling thread looks at the transport, it reads the connection as
never made and reports neither a rejection nor an establishment. DCMTK reads the PDU and says
what it held.
"""

from __future__ import annotations

import subprocess

from deploy.demo.senders import dcmtk, dcmtk_env


def rejection(port: int, calling: str, called: str = "TRIAGE") -> str:
    """The A-ASSOCIATE-RJ DCMTK ``echoscu`` received from ``127.0.0.1:port``, in its words
    ("Result: Rejected Transient, Source: ... Reason: ..."); empty when it was accepted."""
    run = subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60, check=False,
        env=dcmtk_env())
    report = run.stdout + run.stderr
    if run.returncode == 0 or "Association Rejected" not in report:
        return ""
    return " ".join(line.removeprefix("F: ").strip() for line in report.splitlines()
                    if line.startswith("F: Result:") or line.startswith("F: Reason:"))
