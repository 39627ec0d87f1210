//! Job files: parsing, defaults, and every check naming its key.

use super::*;

const MIN: &str = r#"
name = "t"
steps = 10
batch_size = 8
[model]
kind = "mlp"
[data]
kind = "csv"
path = "d.csv"
"#;

#[test]
fn minimal_job_parses_with_defaults() {
    let j = JobSpec::parse(MIN).unwrap();
    assert_eq!(j.seed, 1);
    assert_eq!(j.optimizer.kind, OptimizerKind::Adamw);
    assert_eq!(j.model.hidden, vec![128]);
    assert_eq!(j.run_dir(), PathBuf::from("runs/t"));
    // Round trip through the announced form.
    assert_eq!(JobSpec::parse(&j.to_toml()).unwrap(), j);
}

fn err(text: &str) -> String {
    JobSpec::parse(text).unwrap_err().to_string()
}

#[test]
fn errors_name_the_key() {
    assert!(err(&MIN.replace("steps = 10", "steps = 0")).contains("`steps`"));
    assert!(err(&MIN.replace("steps = 10", "")).contains("`steps` is missing"));
    assert!(err(&MIN.replace("batch_size = 8", "batch_size = 0")).contains("`batch_size`"));
    let micro = MIN.replace("batch_size = 8", "batch_size = 8\nmicro_batch = 2000000");
    assert!(err(&micro).contains("`micro_batch`"));
    // Unset, `micro_batch` stays out of the job's TOML: earlier jobs keep their identity.
    let spec = JobSpec::parse(MIN).unwrap();
    assert_eq!(spec.micro_batch, 0);
    assert!(!spec.to_toml().contains("micro_batch"));
    assert!(err(&MIN.replace("path = \"d.csv\"", "")).contains("`data.path`"));
    assert!(err(&MIN.replace("kind = \"mlp\"", "kind = \"gpt\"")).contains("`model.kind`"));
    assert!(err(&format!("{MIN}[optimizer]\nlr = -1\n")).contains("`optimizer.lr`"));
    let unknown = err(&MIN.replace("steps = 10", "steps = 10\nstepz = 3"));
    assert!(unknown.contains("stepz"), "{unknown}");
    let wrong_type = err(&MIN.replace("steps = 10", "steps = \"ten\""));
    assert!(wrong_type.contains("steps"), "{wrong_type}");
    assert!(err(&MIN.replace("name = \"t\"", "name = \"../x\"")).contains("`name`"));
    assert!(err(&"#".repeat(MAX_JOB_BYTES + 1)).contains("limit"));
}

#[test]
fn gpt_context_must_hold_a_sum() {
    let text = r#"
name = "a"
steps = 1
batch_size = 4
[model]
kind = "gpt"
context = 8
[data]
kind = "arithmetic"
digits = 2
"#;
    assert!(err(text).contains("`model.context` must be at least 9"));
}

#[test]
fn schedules() {
    let mut j = JobSpec::parse(MIN).unwrap();
    j.optimizer.warmup_steps = 10;
    assert!((j.lr_at(0, 110) - j.optimizer.lr / 10.0).abs() < 1e-12);
    assert!((j.lr_at(10, 110) - j.optimizer.lr).abs() < 1e-12);
    assert!(j.lr_at(109, 110) < j.optimizer.lr * 0.01);
    j.optimizer.schedule = Schedule::Constant;
    assert_eq!(j.lr_at(100, 110), j.optimizer.lr);
}

#[test]
fn lm_data_keys() {
    let gpt = MIN.replace("kind = \"mlp\"", "kind = \"gpt\"");
    let jsonl = gpt.replace(
        "kind = \"csv\"\npath = \"d.csv\"",
        "kind = \"jsonl\"\nfiles = \"shards/*.jsonl\"",
    );
    let j = JobSpec::parse(&jsonl).unwrap();
    assert_eq!(j.data.text_field, "text");
    assert_eq!(j.data.messages_field, None);
    assert!(err(&jsonl.replace("files = \"shards/*.jsonl\"", "")).contains("`data.files`"));
    assert!(err(&format!("{jsonl}messages_field = \"m\"\n")).contains("`data.messages_field`"));
    assert!(err(&format!("{jsonl}text_field = \"\"\n")).contains("`data.text_field`"));
    let parquet = jsonl.replace("jsonl", "parquet");
    assert!(JobSpec::parse(&parquet).is_ok());
    assert!(err(&parquet.replace("kind = \"gpt\"", "kind = \"mlp\"")).contains("`model.kind`"));
    let mut j = JobSpec::parse(&parquet).unwrap();
    j.resolve_paths(Path::new("/jobs"), Path::new("/work"));
    assert_eq!(
        j.data.files.as_deref(),
        Some(Path::new("/jobs/shards/*.parquet"))
    );
}

#[test]
fn relative_paths_resolve_against_the_job_dir() {
    let mut j = JobSpec::parse(MIN).unwrap();
    j.resolve_paths(Path::new("/jobs"), Path::new("/work"));
    assert_eq!(j.data.path.as_deref(), Some(Path::new("/jobs/d.csv")));
    assert_eq!(j.output_dir, PathBuf::from("/work/runs"));
    // A model folder too (an absolute one stays).
    let hf = MIN.replace("kind = \"mlp\"", "hf = \"out/model\"").replace(
        "kind = \"csv\"\npath = \"d.csv\"",
        "kind = \"text\"\npath = \"/d.txt\"",
    );
    let mut j = JobSpec::parse(&hf).unwrap();
    j.resolve_paths(Path::new("/jobs"), Path::new("/work"));
    assert_eq!(j.model.hf.as_deref(), Some(Path::new("/jobs/out/model")));
    assert_eq!(j.data.path.as_deref(), Some(Path::new("/d.txt")));
}

#[test]
fn sync_defaults_to_synchronous_steps_and_keeps_the_job_hash() {
    let j = JobSpec::parse(MIN).unwrap();
    assert_eq!(j.sync.kind, SyncKind::Sync);
    assert_eq!(j.sync.outer(), None);
    // An explicit `kind = "sync"` is the same job (same TOML form, same hash).
    let explicit = JobSpec::parse(&format!("{MIN}[sync]\nkind = \"sync\"\n")).unwrap();
    assert_eq!(explicit, j);
    assert_eq!(explicit.hash(), j.hash());
    assert!(!j.to_toml().contains("sync"), "{}", j.to_toml());
}

#[test]
fn diloco_keys_parse_with_the_core_defaults() {
    use coordinator_free::outer_round::{
        DEFAULT_INNER_STEPS, DEFAULT_OUTER_LR, DEFAULT_OUTER_MOMENTUM,
    };
    let j = JobSpec::parse(&format!("{MIN}[sync]\nkind = \"diloco\"\n")).unwrap();
    let c = j.sync.outer().expect("diloco");
    assert_eq!(c.inner_steps, DEFAULT_INNER_STEPS);
    assert_eq!(c.outer_lr, DEFAULT_OUTER_LR);
    assert_eq!(c.outer_momentum, DEFAULT_OUTER_MOMENTUM);
    assert_eq!(
        (c.inner_steps, c.outer_lr, c.outer_momentum),
        (50, 0.7, 0.9)
    );
    assert_ne!(j.hash(), JobSpec::parse(MIN).unwrap().hash());
    let text = format!(
        "{MIN}[sync]\nkind = \"diloco\"\ninner_steps = 5\nouter_lr = 0.5\nouter_momentum = 0.0\n"
    );
    let j = JobSpec::parse(&text).unwrap();
    let c = j.sync.outer().unwrap();
    assert_eq!((c.inner_steps, c.outer_lr, c.outer_momentum), (5, 0.5, 0.0));
    // Round trip through the announced form.
    assert_eq!(JobSpec::parse(&j.to_toml()).unwrap(), j);
}

#[test]
fn sync_compression_parses_for_both_kinds_and_keeps_the_default_hash() {
    use coordinator_free::Compression;
    let none = JobSpec::parse(&format!("{MIN}[sync]\ncompression = \"none\"\n")).unwrap();
    assert_eq!(none.hash(), JobSpec::parse(MIN).unwrap().hash());
    for (text, c) in [("bf16", Compression::Bf16), ("int8", Compression::Int8)] {
        for kind in ["sync", "diloco"] {
            let j = JobSpec::parse(&format!(
                "{MIN}[sync]\nkind = \"{kind}\"\ncompression = \"{text}\"\n"
            ))
            .unwrap();
            assert_eq!(j.sync.compression, c);
            assert_ne!(j.hash(), JobSpec::parse(MIN).unwrap().hash());
            assert_eq!(JobSpec::parse(&j.to_toml()).unwrap(), j);
        }
    }
    let e = err(&format!("{MIN}[sync]\ncompression = \"fp8\"\n"));
    assert!(e.contains("compression") || e.contains("fp8"), "{e}");
}

#[test]
fn sync_errors_name_the_key() {
    let diloco = |extra: &str| format!("{MIN}[sync]\nkind = \"diloco\"\n{extra}\n");
    let e = err(&diloco("inner_steps = 0"));
    assert!(e.contains("`sync.inner_steps` must be at least 1"), "{e}");
    for bad in ["0.0", "-1.0", "nan", "inf", "1e300"] {
        let e = err(&diloco(&format!("outer_lr = {bad}")));
        assert!(
            e.contains("`sync.outer_lr` must be finite and > 0"),
            "{bad}: {e}"
        );
    }
    for bad in ["1.0", "-0.1", "nan"] {
        let e = err(&diloco(&format!("outer_momentum = {bad}")));
        assert!(
            e.contains("`sync.outer_momentum` must be in [0, 1)"),
            "{bad}: {e}"
        );
    }
    // The DiLoCo keys do nothing in synchronous training: refused there.
    for key in ["inner_steps = 5", "outer_lr = 0.7", "outer_momentum = 0.9"] {
        let e = err(&format!("{MIN}[sync]\n{key}\n"));
        let name = key.split(' ').next().unwrap();
        assert!(
            e.contains(&format!(
                "`sync.{name}` applies only with `sync.kind = \"diloco\"`"
            )),
            "{e}"
        );
    }
    let unknown = err(&diloco("inner_stepz = 5"));
    assert!(unknown.contains("inner_stepz"), "{unknown}");
    let kind = err(&format!("{MIN}[sync]\nkind = \"gossip\"\n"));
    assert!(kind.contains("gossip"), "{kind}");
    let wrong_type = err(&diloco("inner_steps = \"five\""));
    assert!(wrong_type.contains("inner_steps"), "{wrong_type}");
}

/// The DiLoCo example job parses, as DiLoCo with its stated settings.
#[test]
fn the_diloco_example_parses() {
    let text = include_str!("../../../../examples/jobs/shakespeare-diloco.toml");
    let c = JobSpec::parse(text).unwrap().sync.outer().expect("diloco");
    assert_eq!(
        (c.inner_steps, c.outer_lr, c.outer_momentum),
        (10, 0.7, 0.9)
    );
}
