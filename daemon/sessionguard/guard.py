"""The embeddable guard: what a chat/agent server calls instead of its own load and save.

``Guard.save`` / ``save_bytes`` is an atomic save (tmp + fsync + rename +
directory fsync) that keeps the prior version before any write that loses
messages, refuses to save a session that was loaded metadata-only and not
fully since (the bug this project exists for), and moves the session's pin
so a later loss by *any* writer is caught. ``recover_on_startup`` heals
unintended losses and never reverts an intended shrink. Library and daemon
share one store, one format and one rule for what "restore" means.

Imports only the standard library and orjson: a server embeds this without
watchdog, structlog or systemd.
"""

from __future__ import annotations

import functools
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from . import events, fsutil, metaload
from .config import DEFAULT_INTENT_KEYS, load_file
from .count import DEFAULT_MAX_BYTES, CountSpec, Parsed, count_doc, parse, stat_hash
from .errors import CorruptSessionError, NotFound, PartialSessionError, UnsafeSessionFile
from .events import GuardEvent
from .naming import DEFAULT_EXCLUDE, Matcher, Reason, Version, validate_sid
from .recovery import RecoveryReport, recover_guard
from .restore import LiveFile, RestoreResult, restore
from .retention import Retention
from .rules import intent_changed, is_loss, most_messages, overtaken, restore_candidate
from .store import STORE_DIRNAME, Store


@dataclass(frozen=True)
class _Write:
    """One save: what to write, its count, the document when the caller gave one, and intent."""

    sid: str
    data: bytes
    count: int | None
    doc: Any
    allow_shrink: bool
    reason: str | None


class PartialDocument(dict[str, Any]):
    """A session's metadata without its messages, as ``Guard.load(sid, metadata_only=True)``
    returns it. ``Guard.save`` refuses it, even if a ``messages`` key was put back."""


class Guard:
    """Guarded load/save/restore for one session directory.

    *count* says where the messages are: a top-level key (default ``messages``),
    a JSON pointer (``/data/messages``) or ``jsonl``. *intent_keys* are the
    metadata keys whose changed value marks a shrink as meant (the daemon's
    defaults: ``intentional_shrink_generation``, ``clear_generation``).
    Session ``<sid>`` lives in ``<session_dir>/<sid><suffix>``; the store
    defaults to ``<session_dir>/.sessionguard``. *on_event* receives every
    :class:`~sessionguard.events.GuardEvent` (also logged to the ``sessionguard`` logger).
    """

    def __init__(self, session_dir: str | os.PathLike[str], count: str = "messages", *,
                 intent_keys: tuple[str, ...] | list[str] = DEFAULT_INTENT_KEYS,
                 store: str | os.PathLike[str] | None = None, suffix: str | None = None,
                 exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDE,
                 retention: Retention | None = None, max_bytes: int = DEFAULT_MAX_BYTES, indent: bool = True,
                 on_event: Callable[[GuardEvent], None] | None = None) -> None:
        self.session_dir = os.path.abspath(os.fspath(session_dir))
        self.spec = CountSpec.parse(count)
        self.suffix = suffix if suffix is not None else (".jsonl" if self.spec.kind == "jsonl" else ".json")
        self.intent_keys = tuple(intent_keys)
        self.max_bytes = max_bytes
        self.matcher = Matcher(f"*{self.suffix}", tuple(exclude))
        self._dump_opts = orjson.OPT_INDENT_2 if indent else 0
        self.emit = events.Emitter(on_event)
        self._dir_fd = os.open(self.session_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dir_id = _ident(os.fstat(self._dir_fd))
        store_path = os.path.abspath(os.fspath(store)) if store is not None else \
            os.path.join(self.session_dir, STORE_DIRNAME)
        parent = fsutil.open_root(os.path.dirname(store_path))
        try:
            self.store, notice = Store.open(parent, os.path.basename(store_path), where=store_path,
                                            expect_uid=os.geteuid(), retention=retention, max_bytes=max_bytes,
                                            keep_lock_open=True)
        finally:
            os.close(parent)
        if notice:
            self.emit("store.replaced", "", level="error", why=notice)
        self._lock = threading.Lock()
        #: Sessions loaded metadata-only and not fully since: a shrinking save of one is refused.
        self._partial: set[str] = set()
        #: What this process last read or wrote of each session: (stat key hash, count).
        self._known: dict[str, tuple[int, int | None]] = {}

    @classmethod
    def from_config(cls, session_dir: str | os.PathLike[str],
                    config: str | os.PathLike[str] = "/etc/sessionguard/sessionguard.toml", **kw: Any) -> Guard:
        """A guard with the settings of the daemon's ``[[watch]]`` for *session_dir* in
        *config* (count, the file pattern and excludes, intent keys, store, retention, size
        cap): one source of truth for the daemon and the server."""
        path = os.path.abspath(os.fspath(session_dir))
        cfg = load_file(os.fspath(config))
        for w in cfg.watches:
            if w.path == path:
                suffix = Matcher(w.pattern).suffix
                if not suffix:
                    raise ValueError(f"{config}: the watch's pattern {w.pattern!r} is not '*<suffix>': "
                                     "the library names session files <sid><suffix>")
                return cls(path, w.count, intent_keys=w.intent_keys, store=w.store or None, suffix=suffix,
                           exclude=w.exclude, retention=w.retention, max_bytes=w.max_file_bytes, **kw)
        raise NotFound(f"{config} has no [[watch]] with path = {path!r}")

    # -- names ---------------------------------------------------------------------

    def path(self, sid: str) -> str:
        return os.path.join(self.session_dir, self._name(sid))

    def _name(self, sid: str) -> str:
        return validate_sid(sid) + self.suffix

    def dir_fd(self) -> int:
        """The session directory's descriptor; reopened if the directory was replaced
        (a save must never land in a deleted directory)."""
        try:
            now = _ident(os.stat(self.session_dir))
        except FileNotFoundError:
            return self._dir_fd
        if now != self._dir_id:
            fd = os.open(self.session_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            os.close(self._dir_fd)
            self._dir_fd, self._dir_id = fd, _ident(os.fstat(fd))
        return self._dir_fd

    def live_file(self, sid: str) -> LiveFile:
        """Where *sid*'s live file is, for :func:`~sessionguard.restore.restore`."""
        st = os.fstat(self.dir_fd())
        return LiveFile(self._dir_fd, self._name(sid), self.spec, (st.st_uid, st.st_gid))

    # -- load ----------------------------------------------------------------------

    def load(self, sid: str, *, metadata_only: bool = False) -> Any:
        """The session's document; with *metadata_only*, everything but the messages.

        A metadata-only load reads only up to the messages when the metadata
        comes first (keys written after the messages need a full load), and
        marks the session partial: a later save of it with fewer messages than
        the file is refused until a full load. Raises ``FileNotFoundError``,
        :class:`UnsafeSessionFile` or :class:`CorruptSessionError`.
        """
        name = self._name(sid)
        fd, st = fsutil.open_regular(name, dir_fd=self.dir_fd())
        try:
            if metadata_only:
                if self.spec.kind == "jsonl":
                    raise ValueError("a jsonl session has no metadata apart from its messages")
                with self._lock:
                    self._partial.add(sid)
                if self.spec.kind == "key":
                    meta = metaload.load_metadata(functools.partial(os.read, fd), self.spec.path[0],
                                                  max_bytes=self.max_bytes)
                    if meta is not None:
                        return PartialDocument(meta)
            parsed = parse(fsutil.read_fd(fd, st, self.max_bytes, name), self.spec)
        finally:
            os.close(fd)
        if not parsed.ok:
            raise CorruptSessionError(f"session {sid!r} is unparseable: {parsed.error}")
        if metadata_only:
            return PartialDocument(_without_messages(parsed.doc, self.spec.path))
        with self._lock:
            self._partial.discard(sid)
            self._known[sid] = (stat_hash(st), parsed.count)
        return parsed.messages if self.spec.kind == "jsonl" else parsed.doc

    # -- save ----------------------------------------------------------------------

    def save(self, sid: str, doc: Any, *, allow_shrink: bool = False, reason: str | None = None) -> Version | None:
        """Serialise *doc* (orjson) and save it; see :meth:`save_bytes`.

        A :class:`PartialDocument` is refused before anything is written.
        """
        if isinstance(doc, PartialDocument):
            self._refuse(sid, None, None, "the document was loaded with metadata_only=True")
        count = count_doc(doc, self.spec)
        if self.spec.kind == "jsonl":
            data = b"".join(orjson.dumps(m) + b"\n" for m in doc)
        else:
            data = orjson.dumps(doc, option=self._dump_opts)
        return self._save(_Write(sid, data, count, doc, allow_shrink, reason))

    def save_bytes(self, sid: str, data: bytes, *, count: int | None = None, allow_shrink: bool = False,
                   reason: str | None = None) -> Version | None:
        """Atomically write the server's own bytes as the session, byte for byte.

        *count* is the number of messages in *data* (the server knows it); without
        it the guard parses *data*. A write that loses messages keeps the prior
        version first: as ``intended`` with *allow_shrink* or a changed intent
        key, else as ``shrink`` with a warning (the save still happens: the server
        stays in charge) — unless the session was loaded metadata-only and not
        fully since: then :class:`PartialSessionError` is raised, the refusal
        logged (``save.refused``), and nothing written. Returns the version kept.
        """
        if count is None:
            parsed = parse(data, self.spec)
            if not parsed.ok:
                raise ValueError(f"refusing to save session {sid!r}: the bytes are not a session ({parsed.error})")
            count = parsed.count
        return self._save(_Write(sid, data, count, None, allow_shrink, reason))

    def _save(self, w: _Write) -> Version | None:
        sid, name = w.sid, self._name(w.sid)
        with self.store.lock(sid):
            dir_fd = self.dir_fd()
            live = fsutil.lstat_at(dir_fd, name)
            if live is not None and not _regular(live):
                raise UnsafeSessionFile(f"{self.path(sid)} is not a regular file (symlinks are never followed)")
            kept = None
            if live is None:
                self._pin_deleted(sid)
            else:
                kept = self._keep_prior(w, dir_fd, name, live)
            st = fsutil.write_file(dir_fd, name, w.data, mode=0o640, like=live)
            self.repin(sid, dir_fd, name, st)
            with self._lock:
                self._known[sid] = (stat_hash(st), w.count)
                self._partial.discard(sid)
        return kept

    def _keep_prior(self, w: _Write, dir_fd: int, name: str, live: os.stat_result) -> Version | None:
        """Before replacing the live file: if this write loses messages, keep what it replaces.

        The live file's count comes from what this process last read or wrote
        when its identity still matches — no read, no parse on the hot path.
        Otherwise it changed behind the guard's back: it is read once, and if
        that foreign write itself lost the pin's messages, the pin is kept
        first. The file being replaced becomes the version by a hard link (it
        is about to be renamed over: no bytes copied), checked against the
        bytes read.
        """
        sid, count = w.sid, w.count
        with self._lock:
            known = self._known.get(sid)
            partial = sid in self._partial
        same = known is not None and known[0] == stat_hash(live)
        if same and known is not None and not is_loss(known[1], count):
            return None
        fd, st = fsutil.open_regular(name, dir_fd=dir_fd)
        try:
            data = fsutil.read_fd(fd, st, self.max_bytes, name)
            prior = parse(data, self.spec)
            if not same:
                self.foreign_change(sid, prior, st)
            if not is_loss(prior.count, count):
                return None
            if partial and not w.allow_shrink:
                self._refuse(sid, prior.count, count, "it was loaded metadata-only and not fully since")
            why: Reason = "intended" if w.allow_shrink or self._intended(prior, w) else "shrink"
            version = self.store.keep(sid, data, prior.count, why, "library", link_from=(dir_fd, name, fd)).version
        finally:
            os.close(fd)
        self.emit("session.shrunk", sid, level="info" if why == "intended" else "warning", reason=why,
                  before=prior.count, after=count, version=version.id, note=w.reason or "")
        return version

    def _intended(self, prior: Parsed, w: _Write) -> bool:
        if not self.intent_keys:
            return False
        new_doc = w.doc if w.doc is not None else parse(w.data, self.spec).doc
        return intent_changed(prior.doc, new_doc, self.intent_keys)

    def _refuse(self, sid: str, before: int | None, after: int | None, why: str) -> None:
        self.emit("save.refused", sid, level="warning", before=before, after=after, reason="partial", why=why)
        raise PartialSessionError(f"refusing to save session {sid!r}: {why}, so this save would drop its "
                                  "messages; load the full session first (or pass allow_shrink=True)")

    def foreign_change(self, sid: str, live: Parsed, st: os.stat_result) -> None:
        """The live file (parsed *live*, stat *st*) changed without the guard: if that
        write lost the pin's messages (or overtook them unseen), keep the pin now. A pin
        that shares the live inode and changed with it (rewritten in place) is reported:
        that version is gone. Caller holds the session's lock."""
        with self._lock:
            known = self._known.get(sid)
        pin = self.store.pins.stat(sid)
        if pin is None:
            return
        if (pin.st_dev, pin.st_ino) == (st.st_dev, st.st_ino):
            if known is not None and is_loss(known[1], live.count):
                self.emit("pin.overwritten", sid, level="error", before=known[1], after=live.count,
                          why="the file was rewritten in place through another name: the pinned version is lost")
            return
        pinned = self.store.read_pin(sid)
        old = parse(pinned[0], self.spec) if pinned else Parsed(None)
        if is_loss(old.count, live.count):
            cause = "loss"
        elif overtaken(old, live):
            cause = "overtaken"
        else:
            return
        captured = self.store.capture(sid, live, spec=self.spec, intent_keys=self.intent_keys, source="library",
                                      cause=cause, method="link")
        if captured is not None:
            self.emit("session.shrunk", sid, level="info" if captured.reason == "intended" else "warning",
                      reason=captured.reason, before=captured.before, after=captured.after,
                      version=captured.version.id, note="written without the guard")

    def _pin_deleted(self, sid: str) -> None:
        """The live file is gone (deleted without the guard): its pin becomes a version."""
        captured = self.store.capture(sid, None, spec=self.spec, intent_keys=(), source="library")
        if captured is not None:
            self.emit("session.shrunk", sid, level="warning", reason="deleted", before=captured.before,
                       after=None, version=captured.version.id, note="deleted without the guard")
        self.store.pins.drop(sid)

    def repin(self, sid: str, dir_fd: int, name: str, st: os.stat_result) -> None:
        """Pin the file just written (*st*: its ``fstat``): a hard link by name, checked
        to be that inode, no bytes copied, no fsync (a pin claims nothing). If another
        writer replaced or removed the file since our rename, the pin is left as it
        was: the next save or the daemon learns the newer file. Linking by name
        spares the hot path an open of the file just written (benchmark 1)."""
        try:
            self.store.pins.link(sid, dir_fd, name, st)
            return
        except FileNotFoundError:
            return
        except OSError:  # another filesystem, or protected_hardlinks: an independent copy
            pass
        try:
            fd, now = fsutil.open_regular(name, dir_fd=dir_fd)
        except (FileNotFoundError, UnsafeSessionFile):
            return
        try:
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                self.store.pins.write(sid, fsutil.read_fd(fd, now, self.max_bytes, name))
        finally:
            os.close(fd)

    # -- versions and restore ----------------------------------------------------------

    def versions(self, sid: str) -> list[Version]:
        """Kept versions of *sid*, oldest first."""
        return self.store.versions.of(validate_sid(sid))

    def restore(self, sid: str, version: str | None = None, *, most: bool = False,
                dry_run: bool = False) -> RestoreResult:
        """Put a version back: *version* (a hash prefix or file name), else the one
        :func:`~sessionguard.rules.restore_candidate` picks (the state just before
        the damage), or with *most* the one with the most messages. The current
        file is kept as a ``pre-restore`` version first: every restore is undoable."""
        target = pick_version(self.versions(sid), sid, version, most=most)
        result = restore(self.store, sid, target, self.live_file(sid), source="library", dry_run=dry_run)
        with self._lock:
            self._known.pop(sid, None)
        if not dry_run and not result.unchanged:
            self.emit("session.restored", sid, level="warning", version=target.id, count=target.count,
                      after=target.count, reason=target.reason, before=result.live_count)
        return result

    def recover_on_startup(self) -> RecoveryReport:
        """Restore sessions an *unintended* write emptied or corrupted; see :mod:`sessionguard.recovery`."""
        return recover_guard(self)

    def close(self) -> None:
        self.store.close()
        os.close(self._dir_fd)


def pick_version(versions: list[Version], sid: str, version: str | None, *, most: bool = False) -> Version:
    """The version a restore, ``show`` or ``diff`` means: by id, ``--most``, or the rule."""
    if version is not None:
        if not isinstance(version, str) or not version:
            raise ValueError("version id must be a non-empty string")
        hits = [v for v in versions if v.name == version or v.id.startswith(version)]
        if hits and len({v.id for v in hits}) == 1:
            return hits[-1]  # one content: several events kept the same bytes (names differ, bytes do not)
        raise NotFound(f"version id {version!r} is ambiguous for session {sid!r}" if hits
                       else f"session {sid!r} has no version {version!r}")
    chosen = most_messages(versions) if most else restore_candidate(versions)
    if chosen is None:
        if not versions:
            raise NotFound(f"session {sid!r} has no kept versions")
        raise NotFound(f"session {sid!r} has nothing to restore: its last change was "
                       f"{'intended' if versions[-1].reason == 'intended' else 'not a loss'} "
                       "(name a VERSION, or use --most for the version with the most messages)")
    return chosen


def _without_messages(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """A copy of *doc* minus the messages at *path* (copies only the dicts on the way)."""
    out = dict(doc)
    node = out
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            return out
        node[part] = dict(child)
        node = node[part]
    node.pop(path[-1], None)
    return out


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)
