# The start of the pyz's __main__.py; build/pyz.py puts shiv's own two lines after it.
#
# shiv unpacks the archive into $SHIV_ROOT, or ~/.shiv, and fails with a traceback when that
# folder cannot be made (service users, read-only containers, HOME=/dev/null). This picks the
# folder first: one that already holds this build, or a writable one, falling back from
# ~/.shiv to a private folder under the system's temporary folder; with neither, it says in
# one line that SHIV_ROOT must be set. Python 3.6 syntax, so that an older interpreter still
# reaches ozwell's own one-line version check.
import json as _json
import os as _os
import stat as _stat
import sys as _sys
import tempfile as _tempfile
import zipfile as _zipfile


def _unpacked_name():
    """The folder shiv unpacks this build into, inside its root."""
    with _zipfile.ZipFile(_sys.argv[0]) as archive:
        build_id = _json.loads(archive.read("environment.json").decode("utf-8"))["build_id"]
    return "%s_%s" % (_os.path.basename(_os.path.realpath(_sys.argv[0])), build_id)


def _usable(root, private=False):
    try:
        _os.makedirs(root, mode=0o700, exist_ok=True)
    except OSError:
        pass  # a read-only folder still serves if this build was unpacked there before
    try:
        info = _os.lstat(root) if private else _os.stat(root)
    except OSError:
        return False
    # In a shared temporary folder, a folder someone else made could hold their code.
    if private and (info.st_mode & 0o022 or (hasattr(_os, "getuid") and info.st_uid != _os.getuid())):
        return False
    return _stat.S_ISDIR(info.st_mode) and (
        _os.access(root, _os.W_OK | _os.X_OK)
        or _os.path.isdir(_os.path.join(root, _unpacked_name(), "site-packages")))


def _choose_shiv_root():
    chosen = _os.environ.get("SHIV_ROOT")
    if chosen:
        if not _usable(chosen):
            _sys.exit("ozwell: SHIV_ROOT=%s is not a folder this user can write; the pyz unpacks "
                      "itself there on first start. Point SHIV_ROOT at a writable folder." % chosen)
        return
    home = _os.path.expanduser(_os.path.join("~", ".shiv"))
    if _usable(home):
        return
    user = str(_os.getuid()) if hasattr(_os, "getuid") else _os.environ.get("USERNAME", "user")
    private = _os.path.join(_tempfile.gettempdir(), "ozwell-shiv-" + user)
    if not _usable(private, private=True):
        _sys.exit("ozwell: nowhere to unpack the pyz: neither %s nor %s is a folder this user "
                  "can write. Set SHIV_ROOT to a writable folder." % (home, private))
    _os.environ["SHIV_ROOT"] = private


_choose_shiv_root()
