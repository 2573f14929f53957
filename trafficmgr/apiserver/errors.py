"""API errors rendered as Kubernetes ``Status`` objects."""

from __future__ import annotations

from .discovery import ResourceType


class ApiError(Exception):
    """An API failure; ``status()`` is the ``v1 Status`` body, ``code`` the HTTP status."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict:
        st = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
              "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            st["details"] = self.details
        return st

    @staticmethod
    def _details(rt: ResourceType | None, name: str) -> dict:
        d: dict = {"name": name}
        if rt is not None:
            if rt.group:
                d["group"] = rt.group
            d["kind"] = rt.plural
        return d

    @classmethod
    def not_found(cls, rt: ResourceType, name: str) -> ApiError:
        qual = rt.plural if not rt.group else f"{rt.plural}.{rt.group}"
        return cls(404, "NotFound", f'{qual} "{name}" not found', cls._details(rt, name))

    @classmethod
    def already_exists(cls, rt: ResourceType, name: str) -> ApiError:
        qual = rt.plural if not rt.group else f"{rt.plural}.{rt.group}"
        return cls(409, "AlreadyExists", f'{qual} "{name}" already exists', cls._details(rt, name))

    @classmethod
    def conflict(cls, rt: ResourceType, name: str) -> ApiError:
        qual = rt.plural if not rt.group else f"{rt.plural}.{rt.group}"
        return cls(409, "Conflict",
                   f'Operation cannot be fulfilled on {qual} "{name}": the object has been modified; '
                   "please apply your changes to the latest version and try again",
                   cls._details(rt, name))

    @classmethod
    def invalid(cls, rt: ResourceType, name: str, message: str) -> ApiError:
        details = cls._details(rt, name)
        details["causes"] = [{"reason": "FieldValueInvalid", "message": message}]
        return cls(422, "Invalid", f'{rt.kind} "{name}" is invalid: {message}', details)

    @classmethod
    def bad_request(cls, message: str) -> ApiError:
        return cls(400, "BadRequest", message)

    @classmethod
    def method_not_allowed(cls, message: str = "the server does not allow this method on the requested resource") -> ApiError:
        return cls(405, "MethodNotAllowed", message)

    @classmethod
    def expired(cls, message: str = "too old resource version") -> ApiError:
        return cls(410, "Expired", message)

    @classmethod
    def gone(cls, message: str) -> ApiError:
        return cls(410, "Gone", message)
