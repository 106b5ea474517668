"""The op schemas, as csrc/vtk_ops.cpp defines them.

Used when the compiled library is missing (VTK_NO_EXTENSION=1, or a build for another torch):
the ops are then defined from Python and served by the reference kernels. A test checks that
these strings equal what the compiled library registers.
"""
SCHEMAS = {
    "cls_attention": "cls_attention(Tensor q, Tensor k, int num_heads, float? scale=None) -> Tensor",
    "attention_received": "attention_received(Tensor q, Tensor k, int num_heads, float? scale=None, bool has_cls=True) -> Tensor",
    "fopru_significance": "fopru_significance(Tensor q, Tensor k, int num_heads, float? scale=None, bool has_cls=True) -> Tensor",
    "topk_indices": "topk_indices(Tensor scores, int k) -> Tensor",
    "gather_tokens": "gather_tokens(Tensor x, Tensor indices) -> Tensor",
    "fopru_select": 'fopru_select(Tensor x, Tensor scores, int keep, str strategy="rank", int grid_width=0) -> (Tensor, Tensor)',
    "vispruner_select": "vispruner_select(Tensor x, Tensor scores, int keep, float important_ratio=0.5, int dedup_step=8) -> Tensor",
    "prumerge": "prumerge(Tensor x, Tensor keys, Tensor scores, int knn=32, bool plus=False, bool per_sample=True) -> (Tensor, Tensor)",
    "attention_received_varlen": "attention_received_varlen(Tensor q, Tensor k, Tensor cu_seqlens, int num_heads, float? scale=None) -> Tensor",
    "glimpse_logits": "glimpse_logits(Tensor q, Tensor k, float? scale=None, Tensor? key_mask=None, bool log_softmax=False) -> Tensor",
    "gather_cache": "gather_cache(Tensor[] tensors, Tensor index) -> Tensor[]",
}
