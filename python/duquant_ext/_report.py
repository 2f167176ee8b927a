"""What the reports of quantize_, load_pack and enable_from_env share: a list of named layers."""
from typing import List


class LayerListReport:
    """Mixin for a dataclass with a `layers` list whose items have a `name`."""

    layers: list

    @property
    def names(self) -> List[str]:
        return [layer.name for layer in self.layers]

    def __len__(self) -> int:
        return len(self.layers)
