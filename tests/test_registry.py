import pytest

from secateurs.errors import ConfigError
from secateurs.registry import Registry


def test_register_get_alias_and_suggestion():
    registry: Registry[int] = Registry("thing")
    registry.register("alpha", aliases=("a",))(1)
    registry.add("beta", 2)
    assert registry.get("alpha") == registry.get("A") == 1
    assert registry.names() == ["alpha", "beta"] and "a" in registry and len(registry) == 2
    with pytest.raises(
        ConfigError, match="Unknown thing 'alpah'. Did you mean 'alpha'.*Known: alpha, beta"
    ):
        registry.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        registry.add("a", 3)
