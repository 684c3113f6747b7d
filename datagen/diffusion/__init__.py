"""diffusers image backends of the image stage (`diffusers-paired`, `diffusers-edit`).

Modules: `attention` (shared self-attention processor), `guidance` (per-sample CFG in one batch),
`generate` (batched pipeline calls), `backend` (draws, retries, best-of-k, records), `paired` and
`edit` (the backends), `loading` (hub id / local folder, dtype, device, scheduler), `tiny`
(hub-free components for tests and benches). torch and diffusers are imported by these modules,
so `datagen.images` imports this package only when a diffusers backend is asked for.
"""
