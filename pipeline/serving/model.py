"""The SavedModel behind the server: its signatures as NumPy in, NumPy out, called from the
engine's one worker thread."""

from __future__ import annotations

import json
from typing import Dict, List

import numpy as np

PREDICT_SIGNATURES = ("sample", "decode", "encode")


class Model:
    """Loads a SavedModel written by `ordered_vqvae.export` (nothing else is read).

    A sampling state is a dict: "codes" int32 [B, K], "position" int32 [B] and "seeds" int32
    [B] as NumPy arrays (small, edited in place when a request takes rows), and "cache",
    the KV cache, as a tensor that only the signatures read and write: the `begin`/`extend`
    contract of `ordered_vqvae.export`, unchanged.
    """

    def __init__(self, path: str):
        import tensorflow as tf

        from ordered_vqvae.export import check_saved_model_dir

        check_saved_model_dir(path)
        self.path = path
        self.tf = tf
        self.module = tf.saved_model.load(path)
        self.signatures = self.module.signatures
        self.code_length = int(self.module.code_length)
        self.codebook_size = int(self.module.codebook_size)
        # What each k is worth and costs, measured at export ({} for older exports).
        profile = getattr(self.module, "quality_profile", None)
        self.profile = json.loads(profile.numpy()) if profile is not None else {}

    def input_specs(self) -> Dict[str, Dict[str, tuple]]:
        """{signature: {input: (dtype name, shape with None for any size)}}, plain data that
        the request parser (possibly in another process) checks bodies against."""
        return {name: {k: (v.dtype.name, tuple(v.shape.as_list()))
                       for k, v in self.signatures[name].structured_input_signature[1].items()}
                for name in PREDICT_SIGNATURES}

    def signature_defs(self, names) -> dict:
        """{signature: SignatureDef proto} of the signatures `names`, read from
        saved_model.pb as TF Serving reads them."""
        from tensorflow.core.protobuf import saved_model_pb2

        saved = saved_model_pb2.SavedModel()
        with self.tf.io.gfile.GFile(f"{self.path}/saved_model.pb", "rb") as f:
            saved.ParseFromString(f.read())
        return {name: saved.meta_graphs[0].signature_def[name] for name in names}

    def begin(self, num_samples: int, seed: int) -> dict:
        tf = self.tf
        out = self.signatures["begin"](num_samples=tf.constant(num_samples, tf.int32),
                                       seed=tf.constant(seed, tf.int32))
        return {k: v if k == "cache" else np.array(v) for k, v in out.items()}

    def start(self, num_samples: int, seed: int) -> dict:
        """What `begin` gives a request's rows but the cache (rows taken over in a batch
        keep theirs: it is overwritten as codes arrive): no codes, position 0, the rows'
        random streams. NumPy only, no graph call."""
        from ordered_vqvae.sampler import FILL_CODE, numpy_row_seeds

        return {"codes": np.full((num_samples, self.code_length), FILL_CODE, np.int32),
                "position": np.zeros(num_samples, np.int32),
                "seeds": numpy_row_seeds(seed, num_samples)}

    def extend(self, state: dict, temperature, limit, steps: int) -> dict:
        tf = self.tf
        out = self.signatures["extend"](
            codes=tf.constant(state["codes"]), cache=state["cache"],
            position=tf.constant(state["position"]), seeds=tf.constant(state["seeds"]),
            temperature=tf.constant(temperature, tf.float32),
            limit=tf.constant(limit, tf.int32), steps=tf.constant(steps, tf.int32))
        if not bool(out["finite"]):
            raise FloatingPointError("the prior produced NaN or Inf logits")
        return {**state, "codes": np.array(out["codes"]), "cache": out["cache"],
                "position": np.array(out["position"])}

    def decode_at(self, codes, num_codes) -> np.ndarray:
        tf = self.tf
        return self.signatures["decode_at"](
            codes=tf.constant(codes, tf.int32),
            num_codes=tf.constant(num_codes, tf.int32))["images"].numpy()

    def call(self, signature: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """One signature on checked inputs (`protocol.predict_inputs`)."""
        specs = self.signatures[signature].structured_input_signature[1]
        out = self.signatures[signature](**{k: self.tf.constant(v, specs[k].dtype)
                                            for k, v in inputs.items()})
        return {k: v.numpy() for k, v in out.items()}

    def take(self, state: dict, rows) -> dict:
        """The rows `rows` of a state (the cache's batch axis is 2)."""
        rows = np.asarray(rows, np.int32)
        return {**{k: state[k][rows] for k in ("codes", "position", "seeds")},
                "cache": self.tf.gather(state["cache"], rows, axis=2)}

    def join(self, states: List[dict]) -> dict:
        return {**{k: np.concatenate([s[k] for s in states])
                   for k in ("codes", "position", "seeds")},
                "cache": self.tf.concat([s["cache"] for s in states], 2)}
