"""Repacks TorchServe's model-server.jar: entries stored (xz compresses them better), foreign natives dropped."""

import re
import sys
import zipfile

src, dst = sys.argv[1], sys.argv[2]
FOREIGN = re.compile(r"META-INF/native/(.*(windows|osx|macos|aarch_64|kqueue).*|linux32/.*)")
kept = dropped = 0
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
        if FOREIGN.fullmatch(info.filename):
            dropped += 1
            continue
        data = zin.read(info)
        info.compress_type = zipfile.ZIP_STORED
        zout.writestr(info, data)
        kept += 1
print(f"kept {kept} entries, dropped {dropped}")
