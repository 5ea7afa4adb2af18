//! MeZO (ZO-SGD): w <- w - lr (g z + wd w), decoupled weight decay skipped for norms.

use super::direction::{Direction, StepKey, TensorZ};
use super::{TensorCtx, ZoConfig, ZoMethod};
use crate::model::{HostTensor, ParamKind};
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
pub fn sgd_update(t: &mut HostTensor, tz: &TensorZ, offset: f32, g: f32, lr: f32, wd: f32) {
    if lr == 0.0 && offset == 0.0 {
        return;
    }
    tz.pass(t, offset, |_, w0, z| {
        if z == 0.0 {
            w0
        } else {
            w0 - lr * (g * z + wd * w0)
        }
    });
}

impl ZoMethod for Mezo {
    fn direction(&self) -> &Direction {
        &DENSE
    }

    fn update_tensor(
        &mut self,
        t: &mut HostTensor,
        ctx: &TensorCtx,
        key: StepKey,
        offset: f32,
        g: f32,
        cfg: &ZoConfig,
    ) -> Result<()> {
        let tz = TensorZ::of(t, ctx.id, key, &DENSE, &[]);
        sgd_update(t, &tz, offset, g, cfg.lr, decay_for(ctx.kind, cfg));
        Ok(())
    }
}
