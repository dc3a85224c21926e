"""Expose the FFmpeg that PyAV's wheel bundles under the names torchcodec loads; run with
.venv-lerobot's python (`make lerobot-venv` does):

    .venv-lerobot/bin/python tests/data/pyav_ffmpeg.py .venv-lerobot/ffmpeg

torchcodec (lerobot's video decoder) links against the system FFmpeg by soname (libavcodec.so.61,
...), which a fresh machine may lack and not be able to install. PyAV's manylinux wheel carries a
complete FFmpeg in `av.libs/`, renamed by auditwheel (libavcodec-<hash>.so.61.19.101) and finding
its own dependencies by those names. DIR gets a symbolic link to every file of `av.libs/` under its
own name, plus lib<name>.so.<major> for each FFmpeg library; with DIR on LD_LIBRARY_PATH torchcodec
loads PyAV's FFmpeg (the same one lerobot encodes its videos with). Prints the links made.
"""

import os
import re
import sys

LIBS = ("avutil", "avcodec", "avformat", "avdevice", "avfilter", "swscale", "swresample")


def main(out: str) -> None:
    import av

    libs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(av.__file__))), "av.libs")
    if not os.path.isdir(libs):
        sys.exit(f"error: {libs} does not exist: this PyAV ({av.__version__}) was not installed from a "
                 f"manylinux wheel that bundles FFmpeg")
    os.makedirs(out, exist_ok=True)
    links = {}
    for name in sorted(os.listdir(libs)):
        target = os.path.join(libs, name)
        links[name] = target
        m = re.fullmatch(r"lib(\w+)-[0-9a-f]{8}\.so\.(\d+)(\.\d+)*", name)
        if m and m[1] in LIBS:
            links[f"lib{m[1]}.so.{m[2]}"] = target
    missing = [lib for lib in LIBS if not any(n.startswith(f"lib{lib}.so.") for n in links)]
    if missing:
        sys.exit(f"error: {libs} lacks {', '.join(missing)}")
    for name, target in links.items():
        path = os.path.join(out, name)
        if os.path.islink(path) or os.path.exists(path):
            os.remove(path)
        os.symlink(target, path)
    print(" ".join(sorted(n for n in links if ".so." in n and "-" not in n)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
