import pytest

from ns_plugin.errors import NSPluginError
from ns_plugin._registry import Registry


def test_registry_decorator_lookup_and_did_you_mean():
    r = Registry("trainer")

    @r.register("standard")
    def standard():
        """Plain cross-entropy fine-tuning."""
        return "s"

    assert r.get("standard") is standard and r.build("standard") == "s"
    assert r.names() == ["standard"] and "standard" in r and len(r) == 1
    assert r.describe() == {"standard": "Plain cross-entropy fine-tuning."}
    with pytest.raises(NSPluginError, match="did you mean 'standard'"):
        r.get("standrd")
    r.register("standard", standard)  # same object twice: no-op
    with pytest.raises(NSPluginError, match="already registered"):
        r.register("standard", lambda: None)
