//! NCCL backend (cargo feature `nccl`): in-place collectives on tch CUDA tensors across the
//! members of a view, through cudarc's `nccl` module with dynamic loading, so shoal builds
//! on machines without CUDA and looks for `libnccl`/`libcuda` only when this is used.
//!
//! No coordinator: the view's smallest member id mints the `ncclUniqueId`
//! ([`coordinator_free::collective::nccl_root`]) and gossips it on the control plane; every
//! member builds its communicator from it with rank = its place in ring order. The
//! communicator is created non-blocking and every wait on it is bounded: past the bound it
//! is aborted and the call returns [`NcclError::Timeout`]. A view change means a new
//! communicator; the old one is aborted when dropped.

use coordinator_free::{NodeId, ReduceOp, Ring, View, ViewHash};
use cudarc::driver::sys as cu;
use cudarc::nccl::{result, sys};
use std::time::{Duration, Instant};

/// Why an NCCL operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    /// libnccl or a CUDA device is not available on this machine.
    #[error("NCCL is unavailable here: {0}")]
    Unavailable(String),
    /// A CUDA driver call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// An NCCL call failed (the communicator is aborted).
    #[error("NCCL: {0}")]
    Nccl(String),
    /// This node is not in the view.
    #[error(transparent)]
    Schedule(#[from] coordinator_free::CollectiveError),
    /// The tensor cannot be reduced by NCCL here (device, layout or dtype).
    #[error("tensor: {0}")]
    Tensor(String),
    /// The id is not an `ncclUniqueId`.
    #[error("an NCCL unique id is 128 bytes, got {0}")]
    BadId(usize),
    /// A wait on the peers exceeded its bound; the communicator was aborted.
    #[error("NCCL {what} did not finish within {after:?}; communicator aborted")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// The bound.
        after: Duration,
    },
}

/// Whether libnccl can be loaded and tch sees a CUDA device.
pub fn available() -> Result<(), NcclError> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(NcclError::Unavailable("libnccl not found".into()));
    }
    if crate::device::cuda_device_count() == 0 {
        return Err(NcclError::Unavailable("no CUDA device".into()));
    }
    Ok(())
}

/// The key naming CUDA device `index` in a view's backend choice
/// ([`coordinator_free::collective::choose_backend`]): 64 bits of the GPU's UUID, never 0, so
/// two members on one GPU report the same key. `None` where NCCL is unavailable.
pub fn device_key(index: usize) -> Option<u64> {
    available().ok()?;
    let ctx = cudarc::driver::CudaContext::new(index).ok()?;
    let uuid = ctx.uuid().ok()?;
    let bytes: Vec<u8> = uuid.bytes.iter().map(|&b| b as u8).collect();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&bytes);
    Some(u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) | 1)
}

/// Mints a fresh `ncclUniqueId` (done by the view's root only).
pub fn mint_id() -> Result<Vec<u8>, NcclError> {
    available()?;
    let id = result::get_uniqueid().map_err(|e| NcclError::Nccl(format!("{e:?}")))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// `NCCL_CONFIG_INITIALIZER` of the NCCL 2.30 headers cudarc binds (feature `nccl-02030`),
/// with `blocking = 0`.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 23000,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        maxP2pPeers: UNDEF,
        numRmaCtx: UNDEF,
    }
}

fn accept_in_progress<T>(r: Result<T, result::NcclError>) -> Result<(), NcclError> {
    match r {
        Ok(_) => Ok(()),
        Err(result::NcclError(sys::ncclResult_t::ncclInProgress)) => Ok(()),
        Err(e) => Err(NcclError::Nccl(format!("{e:?}"))),
    }
}

/// A communicator bound to one view.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    n: usize,
    view: ViewHash,
    device: usize,
    healthy: bool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time (&mut self).
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the communicator of `view` as `me`, on CUDA device `device`, from the id minted
    /// by the view's root. Waits at most `bound` for every member to join.
    pub fn init(
        view: &View,
        me: &NodeId,
        id: &[u8],
        device: usize,
        bound: Duration,
    ) -> Result<NcclComm, NcclError> {
        available()?;
        if id.len() != 128 {
            return Err(NcclError::BadId(id.len()));
        }
        let ring = Ring::for_view(view, me)?;
        let ctx = cudarc::driver::CudaContext::new(device)
            .map_err(|e| NcclError::Cuda(format!("{e:?}")))?;
        ctx.bind_to_thread()
            .map_err(|e| NcclError::Cuda(format!("{e:?}")))?;
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as core::ffi::c_char;
        }
        let mut config = nonblocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` outlive the call; the id is 128 bytes.
        accept_in_progress(unsafe {
            result::comm_init_rank_config(
                &mut comm,
                ring.n as i32,
                uid,
                ring.rank as i32,
                &mut config,
            )
        })?;
        let mut c = NcclComm {
            comm,
            rank: ring.rank,
            n: ring.n,
            view: view.hash,
            device,
            healthy: true,
        };
        c.wait_async("communicator setup", Instant::now() + bound, bound)?;
        Ok(c)
    }

    /// This member's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Members.
    pub fn world_size(&self) -> usize {
        self.n
    }

    /// The CUDA device it runs on.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The view this communicator belongs to.
    pub fn view(&self) -> ViewHash {
        self.view
    }

    fn abort(&mut self, err: NcclError) -> NcclError {
        self.healthy = false;
        // SAFETY: the communicator is valid until dropped.
        let _ = unsafe { result::comm_abort(self.comm) };
        self.comm = std::ptr::null_mut();
        err
    }

    fn wait_async(
        &mut self,
        what: &'static str,
        deadline: Instant,
        bound: Duration,
    ) -> Result<(), NcclError> {
        loop {
            let mut st = sys::ncclResult_t::ncclSuccess;
            // SAFETY: valid communicator, valid out pointer.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut st) };
            match st {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {}
                other => {
                    return Err(self.abort(NcclError::Nccl(format!("{other:?} during {what}"))))
                }
            }
            if Instant::now() >= deadline {
                return Err(self.abort(NcclError::Timeout { what, after: bound }));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// All-reduce of a contiguous CUDA tensor (f32, f16 or bf16) in place, waiting at most
    /// `bound` for the peers. On error the communicator is aborted (make a new one).
    pub fn all_reduce_(
        &mut self,
        t: &mut tch::Tensor,
        op: ReduceOp,
        bound: Duration,
    ) -> Result<(), NcclError> {
        if !self.healthy {
            return Err(NcclError::Nccl("communicator was aborted".into()));
        }
        match t.device() {
            tch::Device::Cuda(d) if d == self.device => {}
            other => {
                return Err(NcclError::Tensor(format!(
                    "on {other:?}, communicator on cuda:{}",
                    self.device
                )))
            }
        }
        if !t.is_contiguous() {
            return Err(NcclError::Tensor("not contiguous".into()));
        }
        let dtype = match t.kind() {
            tch::Kind::Float => sys::ncclDataType_t::ncclFloat32,
            tch::Kind::Half => sys::ncclDataType_t::ncclFloat16,
            tch::Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
            k => {
                return Err(NcclError::Tensor(format!(
                    "dtype {k:?} (f32, f16, bf16 only)"
                )))
            }
        };
        let op = match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        };
        let ptr = t.data_ptr();
        let count = t.numel();
        let deadline = Instant::now() + bound;
        // SAFETY: `ptr` is a live device buffer of `count` elements of `dtype`; the null
        // (legacy default) stream orders the reduction after tch's kernels on it.
        accept_in_progress(unsafe {
            result::all_reduce(ptr, ptr, count, dtype, op, self.comm, std::ptr::null_mut())
        })?;
        self.wait_async("all-reduce launch", deadline, bound)?;
        loop {
            // SAFETY: querying the legacy default stream.
            let q = unsafe { cu::cuStreamQuery(std::ptr::null_mut()) };
            match q {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.abort(NcclError::Cuda(format!("{e:?}")))),
            }
            self.wait_async("all-reduce", deadline, bound)?;
            if Instant::now() >= deadline {
                return Err(self.abort(NcclError::Timeout {
                    what: "all-reduce",
                    after: bound,
                }));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: valid communicator, not used after this.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}
