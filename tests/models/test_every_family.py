"""Every declared family's params can be described abstractly (`abstract_params`: what restoring
a checkpoint, sharding and the memory benchmark start from), from its default config, without
computing anything. A family whose input checks run jnp ops on the example inputs fails this
inside `jax.eval_shape` (I-JEPA's patch-index check did, so its workdirs could not be loaded)."""

import jax
import pytest

from mmjax.models import abstract_params, build_model, families


# families whose default config is refused on purpose (an image token id must be chosen against
# the vocabulary: tests/models/test_llava.py / test_flamingo.py build theirs)
NEEDS_SETTINGS = {"llava": {"image_token_index": 31999}, "flamingo": {"image_token_index": 31999}}


@pytest.mark.parametrize("name", sorted(families()))
def test_abstract_params_of_the_default_config(name):
    record = families()[name]
    config = record.config_class(**NEEDS_SETTINGS.get(name, {}))
    module, config = build_model(name, config)
    shapes = abstract_params(name, module, config)
    leaves = jax.tree_util.tree_leaves(shapes)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
