"""What both front ends read: the loaded models, the lifecycle phase, admission control, the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from glm_image_onnx.server import errors
from glm_image_onnx.server.admission import Admission
from glm_image_onnx.server.metrics import Metrics
from glm_image_onnx.server.models import VERSION, Model

LOADING, READY, DRAINING, STOPPED, FAILED = "LOADING", "READY", "DRAINING", "STOPPED", "FAILED"


@dataclass
class ServerState:
    admission: Admission
    metrics: Metrics
    models: dict[str, Model] = field(default_factory=dict)
    phase: str = LOADING
    reason: str = ""  # why loading failed

    @property
    def ready(self) -> bool:
        return self.phase == READY

    def model(self, name: str, version: str = "") -> Model:
        model = self.models.get(name)
        if model is None:
            if self.phase == LOADING:
                raise errors.unavailable(f"model '{name}': the server is still loading the package; retry when "
                                         "ServerReady is true")
            known = ", ".join(self.models) or "none"
            raise errors.not_found(f"unknown model '{name}' (served models: {known})")
        if version not in ("", VERSION):
            raise errors.not_found(f"model '{name}' has no version '{version}' (served version: {VERSION})")
        return model

    def repository_index(self, only_ready: bool = False) -> list[dict[str, str]]:
        """KServe's repository index (name, version, state, reason), for both front ends."""
        out = []
        for name, model in self.models.items():
            ok = model.ready and self.phase in (READY, DRAINING)
            if only_ready and not ok:
                continue
            out.append({"name": name, "version": VERSION, "state": "READY" if ok else "UNAVAILABLE",
                        "reason": "" if ok else self.phase.lower()})
        return out
