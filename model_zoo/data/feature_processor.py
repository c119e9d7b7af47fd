"""FuxiCTR's FeatureProcessor, adapted to matching data.

Differences from `fuxictr.preprocess.FeatureProcessor` (2.3.10):
- `read_data` passes `schema_overrides=` to `polars.scan_csv` (polars 2 removed `dtypes=`).
- dtypes are looked up in a fixed table, never `eval`-ed from the config.
- sequence features get no `feature_encoder` string (FuxiCTR `eval`s it); models pool them.
- `fit_sides` fits user-side columns on training users only and item-side columns on the
  item corpus, then adds the item id (code = corpus row + 1, 0 = padding) and the history
  sequence that shares the item id embedding.
"""
import glob
import os

import numpy as np
import polars as pl
from fuxictr.preprocess import FeatureProcessor

from ..errors import ConfigError, DataError

DTYPES = {"str": str, "int": int, "float": float}
POLARS_DTYPES = {"str": pl.String, "int": pl.Int64, "float": pl.Float64}
FEATURE_TYPES = ("categorical", "numeric", "sequence", "embedding")
HISTORY_FEATURE = "hist_item_id"


class MatchFeatureProcessor(FeatureProcessor):
    """Feature processor for user/item matching datasets.

    Args:
        feature_cols: list of column specs (`name`, `type`, `source: user|item`, `dtype`, ...).
        dataset_id: dataset name; files go to `<data_root>/<dataset_id>/`.
        data_root: root folder of built datasets.
        max_len: length of the history sequence feature.
        config_file: file the specs came from, named in errors.
    """

    def __init__(self, feature_cols=(), dataset_id=None, data_root="./data/", max_len=20,
                 config_file="dataset_config.yaml"):
        cols = []
        for col in feature_cols:
            col = dict(col)
            for key in ("name", "type", "source"):
                if key not in col:
                    raise ConfigError(f"{config_file}: feature column {col} has no '{key}'")
            if col["type"] not in FEATURE_TYPES:
                raise ConfigError(f"{config_file}: feature {col['name']} has type={col['type']}; "
                                  f"expected one of {FEATURE_TYPES}")
            if col["source"] not in ("user", "item"):
                raise ConfigError(f"{config_file}: feature {col['name']} has source={col['source']}; "
                                  "expected user or item")
            col.setdefault("dtype", "float" if col["type"] in ("numeric", "embedding") else "str")
            if col["dtype"] not in DTYPES:
                raise ConfigError(f"{config_file}: feature {col['name']} has dtype={col['dtype']}; "
                                  f"expected one of {sorted(DTYPES)}")
            col.setdefault("active", True)
            if col["type"] == "sequence":
                col["feature_encoder"] = None
            cols.append(col)
        self._config_cols = cols
        self.max_len = max_len
        # The parent evals dtype strings: hand it the resolved types instead.
        resolved = [dict(c, dtype=DTYPES[c["dtype"]]) for c in cols]
        super().__init__(feature_cols=resolved, label_col=[], dataset_id=dataset_id, data_root=data_root)
        self._polars_schema = {c["name"]: POLARS_DTYPES[c["dtype"]] for c in cols}

    def read_data(self, data_path, data_format="csv", sep=",", n_rows=None, **kwargs):
        """Lazy frame over one file or all `*.<data_format>` files of a folder (polars 2 API)."""
        if not data_path.endswith(data_format):
            data_path = os.path.join(data_path, f"*.{data_format}")
        files = sorted(glob.glob(data_path))
        if not files:
            raise DataError(f"{data_path}: no {data_format} file found")
        if data_format == "csv":
            frames = [pl.scan_csv(f, separator=sep, schema_overrides=self._polars_schema,
                                  low_memory=False, n_rows=n_rows) for f in files]
        elif data_format == "parquet":
            frames = [pl.scan_parquet(f, n_rows=n_rows) for f in files]
        else:
            raise ConfigError(f"data_format={data_format} is not supported; expected csv or parquet")
        return pl.concat(frames)

    def side_columns(self, source):
        return [c["name"] for c in self._config_cols if c["source"] == source and c["active"]]

    def _frame(self, df, source):
        """Polars frame of one side's columns with types the tokenizers expect."""
        out = {}
        for col in self._config_cols:
            if col["source"] != source or not col["active"] or col["type"] == "embedding":
                continue
            values = df[col["name"]]
            if col["type"] in ("categorical", "sequence"):
                out[col["name"]] = pl.Series(col["name"], values.astype(str).to_numpy(), dtype=pl.String)
            else:
                out[col["name"]] = pl.Series(col["name"], values.to_numpy(dtype=np.float64))
        return pl.DataFrame(out)

    def fit_sides(self, train_users, items, n_items):
        """Fit user columns on training users and item columns on the item corpus.

        Args:
            train_users: pandas DataFrame, one row per training user (user-side columns).
            items: pandas DataFrame, one row per item in corpus order (item-side columns).
            n_items: number of items; the item id code of corpus row r is r + 1.
        """
        frame = pl.concat([self._frame(train_users, "user"), self._frame(items, "item")], how="diagonal")
        self.fit(frame.lazy(), rebuild_dataset=True)
        features = self.feature_map.features
        for col in self._config_cols:   # pretrained vectors: remember their width
            if col["type"] == "embedding":
                features[col["name"]]["pretrain_dim"] = int(col.get("pretrain_dim", 0)) or None
        # item_id must precede the history: FuxiCTR shares a table only with an earlier feature
        features["item_id"] = {"source": "item", "type": "categorical", "padding_idx": 0,
                               "vocab_size": n_items + 1}
        features[HISTORY_FEATURE] = {"source": "user", "type": "sequence", "share_embedding": "item_id",
                                     "padding_idx": 0, "max_len": self.max_len, "vocab_size": n_items + 1}
        self.feature_map.num_fields = self.feature_map.get_num_fields()
        self.feature_map.set_column_index()
        self.feature_map.save(self.json_file)

    def transform_side(self, df, source):
        """Encode one side's raw columns to numpy arrays (name -> array)."""
        encoded = {}
        frame = self._frame(df, source)
        batch = {name: frame[name].to_list() for name in frame.columns}
        batch = self.transform(batch)
        for name, values in batch.items():
            encoded[name] = np.asarray(values, dtype=np.float32 if self.feature_map.features[name]["type"]
                                       == "numeric" else np.int64)
        for col in self._config_cols:
            if col["source"] == source and col["active"] and col["type"] == "embedding":
                encoded[col["name"]] = np.stack(df[col["name"]].to_numpy()).astype(np.float32)
        return encoded
