//! NCCL on real GPUs (feature `nccl`). Where there is no GPU or no libnccl this test says
//! why and passes without running; on a machine with GPUs it all-reduces CUDA tensors.
#![cfg(feature = "nccl")]

use coordinator_free::{NodeId, ReduceOp, View, ViewMember};
use shoal_node::nccl::{self, NcclComm};
use std::time::Duration;

fn view_of(n: usize) -> (View, Vec<NodeId>) {
    let ids: Vec<NodeId> = (0..n)
        .map(|i| NodeId::new(format!("gpu-member-{i}")).unwrap())
        .collect();
    let view = View::new(
        1,
        ids.iter()
            .map(|id| ViewMember {
                id: id.clone(),
                incarnation: 1,
            })
            .collect(),
    );
    (view, ids)
}

#[test]
fn nccl_all_reduce_on_cuda_tensors() {
    if let Err(why) = nccl::available() {
        eprintln!("SKIP nccl_all_reduce_on_cuda_tensors: {why}");
        return;
    }
    // One member per GPU, as shoal runs them (NCCL allows one rank per device).
    let n = shoal_node::device::cuda_device_count().clamp(1, 4);
    let (view, ids) = view_of(n);
    let id = nccl::mint_id().unwrap();
    let len = 1_000_003i64;
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let (view, me, id) = (view.clone(), ids[rank].clone(), id.clone());
            std::thread::spawn(move || {
                let mut comm =
                    NcclComm::init(&view, &me, &id, rank, Duration::from_secs(60)).unwrap();
                let dev = tch::Device::Cuda(rank);
                let mut t = (tch::Tensor::arange(len, (tch::Kind::Float, dev)).remainder(16)
                    + rank as f64)
                    .contiguous();
                comm.all_reduce_(&mut t, ReduceOp::Sum, Duration::from_secs(60))
                    .unwrap();
                let mut h = (tch::Tensor::arange(len, (tch::Kind::BFloat16, dev)).remainder(16))
                    .contiguous();
                comm.all_reduce_(&mut h, ReduceOp::Avg, Duration::from_secs(60))
                    .unwrap();
                (t.to(tch::Device::Cpu), h.to(tch::Device::Cpu))
            })
        })
        .collect();
    let base = tch::Tensor::arange(len, (tch::Kind::Float, tch::Device::Cpu)).remainder(16);
    let expected = &base * n as f64 + (n * (n - 1) / 2) as f64;
    for h in handles {
        let (sum, avg) = h.join().unwrap();
        assert!(sum.equal(&expected), "sum differs");
        assert!(avg.to_kind(tch::Kind::Float).equal(&base), "avg differs");
    }
    eprintln!("NCCL all-reduce verified on {n} GPU(s)");
}
