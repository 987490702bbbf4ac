"""Names: session ids, which files are sessions, and the names of kept versions.

Everything that turns a name into meaning lives here, so the library, the
daemon and the control socket agree on it:

* a **session id** is one safe path component (:func:`validate_sid`); a
  recursive watch encodes sub-directories in it (``sub/x.json`` → ``sub%2Fx``,
  ``%`` → ``%25``), a flat watch uses the file name as is;
* a :class:`Matcher` says which names in a watched directory are sessions
  and maps ids back to their path components, refusing ids that would climb
  out of the directory;
* a **version file name** carries everything an admin with ``ls`` needs:
  ``<UTC time>_<N>msgs_<reason>_<source>_<method>_<hash>.version``.

Only the standard library is imported: a server embeds this.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal


def ascii_int(text: str) -> int | None:
    """*text* as a number when it is ASCII digits only, else None.

    Numbers read from outside — a tmp file's pid, a JSON-pointer index, an
    environment value, a group given as a gid — are ASCII. ``str.isdigit``
    also says yes to "²" (which ``int`` refuses, so the reader raised) and to
    other scripts' digits such as "١٢" (which ``int`` reads as 12).
    """
    return int(text) if text.isascii() and text.isdigit() else None


Reason = Literal["shrink", "unparseable", "deleted", "replaced", "intended", "pre-restore"]
Source = Literal["library", "daemon", "admin"]
Method = Literal["link", "reflink", "copy"]

#: Why a version was kept. The first four are unintended losses (what
#: ``restore`` and ``recover`` undo; ``replaced``: a write kept or grew the
#: count but no longer continued the conversation); ``intended`` is a shrink
#: the writer marked as meant; ``pre-restore`` is the live file a restore replaced.
REASONS: tuple[Reason, ...] = ("shrink", "unparseable", "deleted", "replaced", "intended", "pre-restore")
LOSS_REASONS: frozenset[str] = frozenset({"shrink", "unparseable", "deleted", "replaced"})
SOURCES: tuple[Source, ...] = ("library", "daemon", "admin")
METHODS: tuple[Method, ...] = ("link", "reflink", "copy")

VERSION_SUFFIX = ".version"
_TIME_FMT = "%Y%m%dT%H%M%S"
_VERSION_RE = re.compile(
    r"^(?P<time>\d{8}T\d{6})\.(?P<usec>\d{6})Z"
    r"_(?P<count>\d+msgs|unparseable)"
    r"_(?P<reason>shrink|unparseable|deleted|replaced|intended|pre-restore)"
    r"_(?P<source>library|daemon|admin)"
    r"_(?P<method>link|reflink|copy)"
    r"_(?P<hash>[0-9a-f]{16})\.version$"
)


def validate_sid(sid: str) -> str:
    """Return *sid* if it is safe as a single path component, else raise ``ValueError``.

    Rejected: empty, a leading dot (``.``, ``..``, hidden files), ``/`` or NUL
    anywhere, more than 255 bytes, and a str with lone surrogates (a file name
    that is not valid UTF-8, as ``os.fsdecode`` returns it): ids travel in
    JSON and logs, which cannot carry it. This keeps ids from an untrusted
    caller (a socket client, a URL) inside the session directory and the store.
    """
    if not isinstance(sid, str) or not sid:
        raise ValueError("session id must be a non-empty string")
    if "/" in sid or "\0" in sid:
        raise ValueError(f"session id {sid!r} contains '/' or NUL")
    if sid.startswith("."):
        raise ValueError(f"session id {sid!r} starts with a dot")
    try:
        size = len(sid.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("session id must be valid UTF-8") from None
    if size > 255:
        raise ValueError("session id is longer than 255 bytes")
    return sid


def is_sid(name: str) -> bool:
    """True when *name* is a valid session id (store folders of older releases may not be)."""
    try:
        validate_sid(name)
    except ValueError:
        return False
    return True


# -- which files are sessions ---------------------------------------------------

DEFAULT_PATTERN = "*.json"
#: Never sessions: the server's own files (``_index.json``), hidden files
#: (the store, our tmp files and sync cookies), tmp files and backups.
DEFAULT_EXCLUDE: tuple[str, ...] = ("_*", ".*", "*.tmp*", "*.bak*")


@dataclass(frozen=True)
class Matcher:
    """Which names in a watched directory are sessions, and the id of each.

    *suffix* is the literal tail the id drops (``.json`` for ``*.json``);
    *skip* holds root-level names that are never looked into whatever the
    patterns say (the store's folder when it lives in the directory).
    """

    pattern: str = DEFAULT_PATTERN
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    recursive: bool = False
    skip: frozenset[str] = frozenset()

    @functools.cached_property
    def suffix(self) -> str:
        tail = self.pattern[1:]
        if self.pattern.startswith("*") and not any(c in tail for c in "*?["):
            return tail
        return ""

    @functools.cached_property
    def _excluded_re(self) -> re.Pattern[str] | None:
        """Every exclude pattern in one compiled expression: a scan calls :meth:`excluded`
        for each of a million names."""
        return re.compile("|".join(fnmatch.translate(ex) for ex in self.exclude)) if self.exclude else None

    @functools.cached_property
    def _pattern_re(self) -> re.Pattern[str]:
        return re.compile(fnmatch.translate(self.pattern))

    def excluded(self, name: str) -> bool:
        return self._excluded_re is not None and self._excluded_re.match(name) is not None

    def may_be_session(self, name: str) -> bool:
        """Could the name *name*, directly in the watched directory, be a session file?

        True when :meth:`identify` would look at it (the id itself may still be
        refused). The inotify reader asks this of every event's name, so a writer's
        tmp file — three of a rename write's four events — never reaches the queue;
        a restart asks it before looking a name up in its hint."""
        return name not in self.skip and self._pattern_re.match(name) is not None and not self.excluded(name)

    def descend(self, parts: tuple[str, ...]) -> bool:
        """Should a recursive walk enter the directory at *parts* (relative to the root)?"""
        if not self.recursive or not parts:
            return False
        if len(parts) == 1 and parts[0] in self.skip:
            return False
        return not any(self.excluded(p) for p in parts)

    def identify(self, parts: tuple[str, ...]) -> tuple[str | None, str | None]:
        """``(sid, None)`` for a session file at *parts* (path components below
        the root); ``(None, why)`` for a name that matches the pattern but
        cannot be an id (not valid UTF-8, too long); ``(None, None)`` otherwise."""
        if not parts or (len(parts) > 1 and not self.recursive):
            return None, None
        name = parts[-1]
        if parts[0] in self.skip or self._pattern_re.match(name) is None or self.excluded(name):
            return None, None
        if len(parts) > 1 and any(self.excluded(p) for p in parts[:-1]):
            return None, None
        last = name[: len(name) - len(self.suffix)] if self.suffix else name
        if not last:
            return None, None
        rel = (*parts[:-1], last)
        try:
            "/".join(rel).encode("utf-8")  # os.fsdecode turned undecodable bytes into lone surrogates
        except UnicodeEncodeError:
            return None, "name is not valid UTF-8: not a session id"
        sid = "%2F".join(p.replace("%", "%25") for p in rel) if self.recursive else rel[0]
        try:
            return validate_sid(sid), None
        except ValueError as exc:
            return None, f"{exc}: not a session id"

    def parts_for(self, sid: str) -> tuple[str, ...]:
        """The path components of session *sid*'s file; ``ValueError`` for an id
        that names no file of this watch (e.g. ``x%2F..%2Fy`` in a recursive one)."""
        validate_sid(sid)
        if not self.recursive:
            name = sid + self.suffix
            parts: tuple[str, ...] = (name,)
        else:
            rel = [p.replace("%25", "%") for p in sid.split("%2F")]
            if any(p in ("", ".", "..") for p in rel):
                raise ValueError(f"session id {sid!r} names no file here "
                                 "(an encoded sub-directory path with an empty, '.' or '..' part)")
            rel[-1] += self.suffix
            parts = tuple(rel)
        sid_back, _ = self.identify(parts)
        if sid_back != sid:
            raise ValueError(f"session id {sid!r} names no session file of this directory")
        return parts


# -- version file names ---------------------------------------------------------

@dataclass(frozen=True)
class Version:
    """A kept prior version of a session; everything but *size* is in its file name."""

    id: str
    sid: str
    created: float
    count: int | None
    size: int
    reason: str
    source: str
    method: str
    name: str

    @property
    def is_loss(self) -> bool:
        """Kept because a write lost messages without meaning to."""
        return self.reason in LOSS_REASONS

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "sid": self.sid,
            "created": datetime.fromtimestamp(self.created, UTC).isoformat(),
            "count": self.count,
            "size": self.size,
            "reason": self.reason,
            "source": self.source,
            "method": self.method,
            "name": self.name,
        }


def version_name(created: float, count: int | None, *, reason: Reason, source: Source, method: Method,
                 digest: str) -> str:
    """The file name of a version: sortable by time, readable by an admin."""
    if reason not in REASONS or source not in SOURCES or method not in METHODS:
        raise ValueError(f"bad reason/source/method {reason!r}/{source!r}/{method!r}")
    stamp = datetime.fromtimestamp(created, UTC)
    count_s = "unparseable" if count is None else f"{count}msgs"
    return (f"{stamp.strftime(_TIME_FMT)}.{stamp.microsecond:06d}Z_{count_s}_{reason}_{source}_{method}_"
            f"{digest}{VERSION_SUFFIX}")


def parse_version_name(sid: str, name: str, size: int) -> Version | None:
    """The :class:`Version` a file name describes, or None for any other name."""
    m = _VERSION_RE.match(name)
    if m is None:
        return None
    created = datetime.strptime(m["time"], _TIME_FMT).replace(tzinfo=UTC).timestamp() + int(m["usec"]) / 1e6
    count = None if m["count"] == "unparseable" else int(m["count"][:-4])
    return Version(m["hash"], sid, created, count, size, m["reason"], m["source"], m["method"], name)
