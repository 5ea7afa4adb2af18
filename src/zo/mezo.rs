//! MeZO (ZO-SGD): w <- w - lr (g z + wd w), decoupled weight decay skipped for norms.

use super::direction::{Direction, StepKey};
use super::passes::{Rule, ZSpec, ZoBackend};
use super::{TensorCtx, ZoConfig, ZoMethod};
use crate::model::ParamKind;
use anyhow::Result;

pub struct Mezo;

const DENSE: Direction = Direction::Dense;

/// Weight decay for a tensor: none for norms.
pub fn decay_for(kind: ParamKind, cfg: &ZoConfig) -> f32 {
    if kind == ParamKind::Norm {
        0.0
    } else {
        cfg.weight_decay
    }
}

/// The SGD update along a (dense or sparse) z, restoring from w0 + offset z. Elements that
/// z does not move (sparse mask) are left untouched, weight decay included.
#[allow(clippy::too_many_arguments)]
pub fn sgd_update<B: ZoBackend>(
    backend: &B,
    t: &mut B::Weight,
    id: usize,
    key: StepKey,
    z: ZSpec,
    offset: f32,
    g: f32,
    cfg: &ZoConfig,
    wd: f32,
) -> Result<()> {
    if cfg.lr == 0.0 && offset == 0.0 {
        return Ok(());
    }
    let rule = Rule::Sgd { lr: cfg.lr, g, wd };
    backend.zo_pass(t, id, key, z, offset, rule, None)
}

impl<B: ZoBackend> ZoMethod<B> for Mezo {
    fn direction(&self) -> &Direction {
        &DENSE
    }

    fn update_tensor(
        &mut self,
        backend: &B,
        t: &mut B::Weight,
        ctx: &TensorCtx,
        key: StepKey,
        offset: f32,
        g: f32,
        cfg: &ZoConfig,
    ) -> Result<()> {
        let wd = decay_for(ctx.kind, cfg);
        sgd_update(backend, t, ctx.id, key, ZSpec::Dense, offset, g, cfg, wd)
    }
}
