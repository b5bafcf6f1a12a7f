"""Writing files so that a crash never leaves half of one: write beside, then rename into place.

``os.replace`` is atomic on one file system: a reader sees the old file or the new one,
never a mix. The data, the checkpoints and the adapters all write through here: one file with
``write_atomically``, a folder of files that belong together with ``replace_folder_atomically``.
"""

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None], previous: Path | None = None) -> None:
    """Call ``write(temporary_path)`` in ``path``'s folder, then rename onto ``path``.

    A crash midway leaves either the old file or the new one, never half of one.

    Args:
        previous: where the file at ``path`` is moved (a rename, replacing what was there) once
            the new one is written whole, just before the new one takes its name: the file
            before the newest is kept. A crash between the two renames leaves the new file under
            its temporary name and the old one as ``previous``, with nothing at ``path``.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())  # on disk before the rename makes it the real file
        if previous is not None and path.is_file():
            os.replace(path, previous)  # only now: until the new file is whole, the old one keeps its name
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def replace_folder_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_folder)`` in a new folder beside ``folder``, then swap it in for ``folder``.

    A reader of ``folder`` sees the old set of files, the new set or, for an instant between two
    renames, no folder; never new files beside old ones. The written files are fsynced first. A
    rename cannot replace a folder that holds files, so an existing ``folder`` is renamed aside
    (``.<name>.old-<random>``), the new one (``.<name>.tmp-<random>``) renamed into place, and
    the old one deleted. If anything fails, the temporaries are removed and the old folder is
    back as it was; a crash between the two renames leaves it under its ``.old-`` name.

    Raises:
        NotADirectoryError: ``folder`` exists and is a file.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder; remove it or choose another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    suffix = secrets.token_hex(4)
    new, old = folder.parent / f".{folder.name}.tmp-{suffix}", folder.parent / f".{folder.name}.old-{suffix}"
    new.mkdir()  # a plain mkdir, so the folder gets the permissions mkdir gives (mkdtemp's are private)
    try:
        write(new)
        for path in new.rglob("*"):
            if path.is_file():
                with open(path, "rb") as written:
                    os.fsync(written.fileno())  # on disk before the rename makes them the real files
        if folder.exists():
            os.replace(folder, old)
        try:
            os.replace(new, folder)
        except BaseException:
            if old.exists():
                os.replace(old, folder)  # the old folder back where it was
            raise
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)  # only once the new folder is in place
