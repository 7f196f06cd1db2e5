import numpy as np
import pyarrow as pa

from dml_ray.retrieval.prototypes import class_prototypes, fixed_list_to_numpy


def test_prototypes_are_class_means():
    labels = np.array([3, 1, 3, 3, 1])
    gap = np.arange(10, dtype=np.float32).reshape(5, 2)
    emb = np.eye(5, 3, dtype=np.float32)
    table = class_prototypes(labels, gap, emb, 2 * emb, emb + 1, "m", "r")
    assert table.column("label").to_pylist() == [1, 3]
    assert table.column("n_samples").to_pylist() == [2, 3]
    np.testing.assert_allclose(fixed_list_to_numpy(table.column("gap_feature")), [[5, 6], [10 / 3, 13 / 3]], rtol=1e-6)
    np.testing.assert_allclose(fixed_list_to_numpy(table.column("embedding")), [[0, 1 / 2, 0], [1 / 3, 0, 1 / 3]])
    # mean raw = mean of (sum of equivalent features + bias): a prototype stays a valid decomposition reference
    np.testing.assert_allclose(fixed_list_to_numpy(table.column("raw_embedding")),
                               2 * fixed_list_to_numpy(table.column("embedding")))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 3)
