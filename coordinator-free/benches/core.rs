//! Micro-benchmarks of the sans-IO core: the control-plane codec, view hashing, and the
//! membership machine's heartbeat path.

use coordinator_free::{
    Capabilities, ControlMessage, Heartbeat, Membership, MembershipConfig, NodeId, View, ViewHash,
    ViewMember,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn heartbeat(i: u64, seq: u64) -> Heartbeat {
    Heartbeat {
        id: NodeId::new(format!("12D3KooWnode{i:040}")).unwrap(),
        incarnation: 1,
        seq,
        view_epoch: 3,
        view_hash: ViewHash([7; 32]),
        caps: Capabilities {
            cores: 16,
            ram_bytes: 128 << 30,
            gpus: vec![],
            speed_mflops: 0,
            device: "cpu".into(),
            device_free_bytes: 64 << 30,
        },
        addrs: vec![format!("/ip4/10.0.0.{i}/tcp/4411/p2p/12D3KooWnode{i:040}")],
        data_addr: None,
    }
}

fn bench(c: &mut Criterion) {
    let msg = ControlMessage::Heartbeat(heartbeat(1, 1));
    let bytes = msg.encode().unwrap();
    c.bench_function("codec/encode_heartbeat", |b| {
        b.iter(|| black_box(&msg).encode().unwrap())
    });
    c.bench_function("codec/decode_heartbeat", |b| {
        b.iter(|| ControlMessage::decode(black_box(&bytes)).unwrap())
    });
    let members: Vec<ViewMember> = (0..64)
        .map(|i| ViewMember {
            id: NodeId::new(format!("12D3KooWnode{i:040}")).unwrap(),
            incarnation: 1,
        })
        .collect();
    c.bench_function("view/hash_64_members", |b| {
        b.iter(|| View::hash_of(black_box(9), black_box(&members)))
    });
    c.bench_function("membership/handle_heartbeat_16_peers", |b| {
        let mut m = Membership::new(
            NodeId::new("12D3KooWself").unwrap(),
            1,
            Capabilities::default(),
            vec![],
            MembershipConfig::default(),
            0,
        );
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            for i in 0..16 {
                let _ = m.handle_heartbeat(heartbeat(i, seq), seq);
            }
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
