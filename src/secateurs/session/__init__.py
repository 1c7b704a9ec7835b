"""Where the weights live: in memory (``ResidentSession``) or read from disk one layer at a
time (``session.lazy.LazySession``), and the one engine that runs calibration windows through
either (``session.flow``). ``secateurs.sources.open_session`` picks the session for a run."""

from secateurs.session.base import Session
from secateurs.session.resident import ResidentSession

__all__ = ["ResidentSession", "Session"]
