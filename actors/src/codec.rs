//! Records <-> tensors: VRPO pairs (one record per pair: start, both paths, their noises, the
//! endpoint values, the reference path log-probabilities) back into one `VrpoBatch` of stacked
//! tensors for a learner, and DF-DPO (winner, loser) clip pairs. Records decode on the CPU; the
//! stacked batch moves to the learner's device here, once per tensor of the batch.

use candle_core::{Device, Tensor};
use tilt_kernels::vrpo::{SegmentPair, VrpoBatch};

use crate::replay::{payload_to_tensors, tensors_to_payload, Record};
use crate::{ActorError, Result};

/// Stack L+1 tensors [B, ...] into [B, L+1, ...] (rows first, so a row is one narrow).
fn rows_first(ts: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::stack(ts, 1)?.contiguous()?)
}

/// One record per row of a scored segment pair. `next_seq` numbers them.
pub fn pair_records(
    pair: &SegmentPair,
    v_a: &Tensor,
    v_b: &Tensor,
    producer: u32,
    version: u64,
    next_seq: &mut u64,
) -> Result<Vec<Record>> {
    // Records are host bytes: each stack comes to the host once (a no-op on the CPU), as a row view
    // of a GPU tensor would be copied whole, once per row.
    let host = |ts: &[Tensor]| -> Result<Tensor> { Ok(rows_first(ts)?.to_device(&Device::Cpu)?) };
    let xa = host(&pair.a.states)?; // [B, L+1, ...]
    let za = host(&pair.a.noises)?; // [B, L, ...]
    let xb = host(&pair.b.states)?;
    let zb = host(&pair.b.noises)?;
    let va = v_a.to_vec1::<f32>()?;
    let vb = v_b.to_vec1::<f32>()?;
    let la = pair.a.log_prob.to_vec1::<f32>()?;
    let lb = pair.b.log_prob.to_vec1::<f32>()?;
    let classes = pair.cond.as_ref().map(|c| c.to_vec1::<u32>()).transpose()?;
    let b = xa.dim(0)?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let row = |t: &Tensor| -> Result<Tensor> { Ok(t.get(i)?) };
        let payload = tensors_to_payload(&[
            ("xa", &row(&xa)?),
            ("za", &row(&za)?),
            ("xb", &row(&xb)?),
            ("zb", &row(&zb)?),
        ])?;
        let mut scalars = vec![
            ("k_start".into(), pair.k_start as f64),
            ("v_a".into(), va[i] as f64),
            ("v_b".into(), vb[i] as f64),
            ("ref_logp_a".into(), la[i] as f64),
            ("ref_logp_b".into(), lb[i] as f64),
        ];
        if let Some(c) = &classes {
            scalars.push(("class".into(), c[i] as f64));
        }
        out.push(Record {
            seq: *next_seq,
            producer,
            version,
            payload,
            scalars,
        });
        *next_seq += 1;
    }
    Ok(out)
}

/// Decode records into one learner batch. Every record must hold the same segment length, and
/// either every record carries a class (a class-conditional run) or none does.
pub fn records_to_batch(records: &[Record], device: &Device) -> Result<VrpoBatch> {
    if records.is_empty() {
        return Err(ActorError::Replay(
            "cannot build a batch from zero records".into(),
        ));
    }
    let mut cols: [Vec<Tensor>; 4] = Default::default();
    let (mut ks, mut va, mut vb, mut cs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in records {
        let bad = |detail: String| ActorError::Record {
            seq: r.seq,
            producer: r.producer,
            detail,
        };
        let mut ts = payload_to_tensors(&r.payload)?;
        for (j, name) in ["xa", "za", "xb", "zb"].iter().enumerate() {
            let t = ts
                .remove(*name)
                .ok_or_else(|| bad(format!("missing tensor {name}")))?;
            cols[j].push(t);
        }
        let get = |n: &str| {
            r.scalar(n)
                .ok_or_else(|| bad(format!("missing scalar {n}")))
        };
        ks.push(get("k_start")? as usize);
        va.push(get("v_a")? as f32);
        vb.push(get("v_b")? as f32);
        if let Some(c) = r.scalar("class") {
            cs.push(c as u32);
        }
    }
    if !cs.is_empty() && cs.len() != records.len() {
        return Err(ActorError::Replay(format!(
            "{} of {} records in one batch carry a class: conditional and unconditional pairs mixed",
            cs.len(),
            records.len()
        )));
    }
    let unstack = |ts: &[Tensor]| -> Result<Vec<Tensor>> {
        let s = Tensor::stack(ts, 1)?.to_device(device)?; // [L(+1), B, ...]
        (0..s.dim(0)?).map(|j| Ok(s.get(j)?)).collect()
    };
    let shape0 = cols[0][0].shape().clone();
    if cols[0].iter().any(|t| t.shape() != &shape0) {
        return Err(ActorError::Replay(
            "records in one batch have different segment shapes".into(),
        ));
    }
    let b = records.len();
    Ok(VrpoBatch {
        k_starts: ks,
        xa: unstack(&cols[0])?,
        za: unstack(&cols[1])?,
        xb: unstack(&cols[2])?,
        zb: unstack(&cols[3])?,
        v_a: Tensor::from_vec(va, b, device)?,
        v_b: Tensor::from_vec(vb, b, device)?,
        cond: if cs.is_empty() {
            None
        } else {
            Some(Tensor::from_vec(cs, b, device)?)
        },
    })
}

/// One record per unscored `SegmentPair` batch (rollout -> critic across processes, worker mode):
/// stacked states [L+1, B, ...], noises [L, B, ...] and reference path log-probs [B] of both paths.
pub fn segment_pair_record(pair: &SegmentPair, producer: u32, seq: u64) -> Result<Record> {
    let st = |ts: &[Tensor]| -> Result<Tensor> { Ok(Tensor::stack(ts, 0)?.contiguous()?) };
    let (xa, za, xb, zb) = (
        st(&pair.a.states)?,
        st(&pair.a.noises)?,
        st(&pair.b.states)?,
        st(&pair.b.noises)?,
    );
    let mut named: Vec<(&str, &Tensor)> = vec![
        ("xa", &xa),
        ("za", &za),
        ("la", &pair.a.log_prob),
        ("xb", &xb),
        ("zb", &zb),
        ("lb", &pair.b.log_prob),
    ];
    if let Some(c) = &pair.cond {
        named.push(("cond", c));
    }
    let payload = tensors_to_payload(&named)?;
    Ok(Record {
        seq,
        producer,
        version: 0,
        payload,
        scalars: vec![("k_start".into(), pair.k_start as f64)],
    })
}

/// Inverse of `segment_pair_record`.
pub fn record_segment_pair(r: &Record, device: &Device) -> Result<SegmentPair> {
    let bad = |detail: String| ActorError::Record {
        seq: r.seq,
        producer: r.producer,
        detail,
    };
    let mut ts = payload_to_tensors(&r.payload)?;
    let mut take = |n: &str| -> Result<Tensor> {
        Ok(ts
            .remove(n)
            .ok_or_else(|| bad(format!("missing tensor {n}")))?
            .to_device(device)?)
    };
    let unstack =
        |t: Tensor| -> Result<Vec<Tensor>> { (0..t.dim(0)?).map(|j| Ok(t.get(j)?)).collect() };
    let k_start = r
        .scalar("k_start")
        .ok_or_else(|| bad("missing scalar k_start".into()))? as usize;
    let a = tilt_kernels::logprob::Segment {
        k_start,
        states: unstack(take("xa")?)?,
        noises: unstack(take("za")?)?,
        log_prob: take("la")?,
    };
    let b = tilt_kernels::logprob::Segment {
        k_start,
        states: unstack(take("xb")?)?,
        noises: unstack(take("zb")?)?,
        log_prob: take("lb")?,
    };
    let cond = ts.remove("cond").map(|c| c.to_device(device)).transpose()?;
    Ok(SegmentPair {
        k_start,
        a,
        b,
        cond,
    })
}

/// Decode DF-DPO (winner, loser) clip pairs into two stacked tensors [B, T, C, H, W] on `device`.
pub fn records_to_clip_pairs(records: &[Record], device: &Device) -> Result<(Tensor, Tensor)> {
    let (mut w, mut l) = (
        Vec::with_capacity(records.len()),
        Vec::with_capacity(records.len()),
    );
    for r in records {
        let mut ts = payload_to_tensors(&r.payload)?;
        let bad = |n: &str| ActorError::Record {
            seq: r.seq,
            producer: r.producer,
            detail: format!("missing tensor {n}"),
        };
        w.push(ts.remove("w").ok_or_else(|| bad("w"))?);
        l.push(ts.remove("l").ok_or_else(|| bad("l"))?);
    }
    Ok((
        Tensor::stack(&w, 0)?.to_device(device)?,
        Tensor::stack(&l, 0)?.to_device(device)?,
    ))
}

/// Decode final-sample pairs (the Diffusion-DPO baseline): winners and losers stacked [B, ...] on
/// `device`, and their classes [B] when the records carry them (all or none).
pub fn records_to_final_pairs(
    records: &[Record],
    device: &Device,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (w, l) = records_to_clip_pairs(records, device)?;
    let cs: Vec<u32> = records
        .iter()
        .filter_map(|r| r.scalar("class").map(|c| c as u32))
        .collect();
    let cond = match cs.len() {
        0 => None,
        n if n == records.len() => Some(Tensor::from_vec(cs, n, device)?),
        n => {
            return Err(ActorError::Replay(format!(
                "{n} of {} records in one batch carry a class",
                records.len()
            )))
        }
    };
    Ok((w, l, cond))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tilt_kernels::mixture::{AnalyticDenoiser, GaussianMixture};
    use tilt_kernels::rng::rng_for;
    use tilt_kernels::schedule::{SamplingGrid, VpSchedule};
    use tilt_kernels::vrpo::make_segment_pairs;

    #[test]
    fn segment_pairs_round_trip_bit_exact() {
        // Encode -> bytes -> decode gives the same tensors, bit for bit.
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let r = AnalyticDenoiser {
            mixture: GaussianMixture::quickstart(),
            schedule: s,
        };
        let pairs = make_segment_pairs(
            &r,
            &g,
            &[2],
            5,
            4,
            None,
            &mut rng_for(0, 0, 0),
            &Device::Cpu,
        )
        .unwrap();
        for (i, p) in pairs.iter().enumerate() {
            let rec =
                Record::decode(&segment_pair_record(p, 3, i as u64).unwrap().encode()).unwrap();
            let q = record_segment_pair(&rec, &Device::Cpu).unwrap();
            assert_eq!(q.k_start, p.k_start);
            for (x, y) in
                p.a.states
                    .iter()
                    .chain(&p.b.noises)
                    .zip(q.a.states.iter().chain(&q.b.noises))
            {
                assert_eq!(x.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
            }
            assert_eq!(
                p.b.log_prob.to_vec1::<f32>().unwrap(),
                q.b.log_prob.to_vec1::<f32>().unwrap()
            );
            assert!(q.cond.is_none());
        }
    }

    #[test]
    fn classes_travel_with_pairs_and_records() {
        // A class-conditional pair: the classes survive the rollout -> critic record, become one
        // scalar per learner record, and come back as the batch's cond in record order.
        let s = VpSchedule::ddpm_default();
        let g = SamplingGrid::new(&s, 20, 1.0).unwrap();
        let r = AnalyticDenoiser {
            mixture: GaussianMixture::quickstart(),
            schedule: s,
        };
        let cond = Tensor::new(&[2u32, 0, 1], &Device::Cpu).unwrap();
        let pairs = make_segment_pairs(
            &r,
            &g,
            &[2],
            3,
            5,
            Some(&cond),
            &mut rng_for(0, 0, 0),
            &Device::Cpu,
        )
        .unwrap();
        let p = &pairs[1];
        let rec = Record::decode(&segment_pair_record(p, 1, 0).unwrap().encode()).unwrap();
        let q = record_segment_pair(&rec, &Device::Cpu).unwrap();
        assert_eq!(q.cond.unwrap().to_vec1::<u32>().unwrap(), vec![2, 0, 1]);
        let v = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        let mut seq = 0;
        let mut recs = pair_records(p, &v, &v, 1, 0, &mut seq).unwrap();
        recs.reverse();
        let batch = records_to_batch(&recs, &Device::Cpu).unwrap();
        assert_eq!(batch.cond.unwrap().to_vec1::<u32>().unwrap(), vec![1, 0, 2]);
        // Mixing conditional and unconditional records in one batch is an error, not a guess.
        let mut plain = pair_records(&pairs[0], &v, &v, 1, 0, &mut seq).unwrap();
        for r in &mut plain {
            r.scalars.retain(|(n, _)| n != "class");
        }
        recs.extend(plain);
        let e = records_to_batch(&recs, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("carry a class"), "{e}");
    }
}
