//! What an emulation did, and counters over many emulations.

use std::fmt;

/// The instruction classes this crate emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Int3,
    Clac,
    Stac,
    Popcnt,
    Fwait,
    Ldmxcsr,
    Stmxcsr,
    /// Legacy-SSE data moves (movd/movq/movdqa/movups/movss/movlps/...).
    SseMove,
    /// Legacy-SSE bitwise logic (pxor/xorps/por/pand/andnps/...).
    SseLogic,
    /// VEX-encoded moves and logic (vmovdqu/vmovd/vpxor/...), vzeroupper, vzeroall.
    AvxMove,
    Movnti,
    Cmpxchg8b,
    Cmpxchg16b,
    Fxsave,
    Fxrstor,
    Xsave,
    Xsaveopt,
    Xsavec,
    Xsaves,
    Xrstor,
    Xrstors,
    Xgetbv,
    Verr,
    Verw,
}

impl Kind {
    /// Every kind, in counter/report order.
    pub const ALL: [Kind; 24] = [
        Kind::Int3,
        Kind::Clac,
        Kind::Stac,
        Kind::Popcnt,
        Kind::Fwait,
        Kind::Ldmxcsr,
        Kind::Stmxcsr,
        Kind::SseMove,
        Kind::SseLogic,
        Kind::AvxMove,
        Kind::Movnti,
        Kind::Cmpxchg8b,
        Kind::Cmpxchg16b,
        Kind::Fxsave,
        Kind::Fxrstor,
        Kind::Xsave,
        Kind::Xsaveopt,
        Kind::Xsavec,
        Kind::Xsaves,
        Kind::Xrstor,
        Kind::Xrstors,
        Kind::Xgetbv,
        Kind::Verr,
        Kind::Verw,
    ];

    /// Stable lower-case name, used in counter reports and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Int3 => "int3",
            Kind::Clac => "clac",
            Kind::Stac => "stac",
            Kind::Popcnt => "popcnt",
            Kind::Fwait => "fwait",
            Kind::Ldmxcsr => "ldmxcsr",
            Kind::Stmxcsr => "stmxcsr",
            Kind::SseMove => "sse_move",
            Kind::SseLogic => "sse_logic",
            Kind::AvxMove => "avx_move",
            Kind::Movnti => "movnti",
            Kind::Cmpxchg8b => "cmpxchg8b",
            Kind::Cmpxchg16b => "cmpxchg16b",
            Kind::Fxsave => "fxsave",
            Kind::Fxrstor => "fxrstor",
            Kind::Xsave => "xsave",
            Kind::Xsaveopt => "xsaveopt",
            Kind::Xsavec => "xsavec",
            Kind::Xsaves => "xsaves",
            Kind::Xrstor => "xrstor",
            Kind::Xrstors => "xrstors",
            Kind::Xgetbv => "xgetbv",
            Kind::Verr => "verr",
            Kind::Verw => "verw",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An exception the worker must inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// For #PF: the faulting linear address, to load into CR2.
    pub cr2: Option<u64>,
}

impl Exception {
    pub const BP: u8 = 3;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;

    pub(crate) fn new(vector: u8) -> Self {
        Exception {
            vector,
            error_code: None,
            cr2: None,
        }
    }

    pub(crate) fn with_code(vector: u8, code: u32) -> Self {
        Exception {
            vector,
            error_code: Some(code),
            cr2: None,
        }
    }

    /// True for a software exception (`int3`): RIP already points past the instruction, and
    /// the worker injects it as a software exception (instruction length known). Otherwise it
    /// is a fault: RIP still points at the instruction and no register was changed.
    pub fn is_software(&self) -> bool {
        self.vector == Self::BP
    }
}

/// Result of [`crate::emulate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Emulated; RIP now points past the instruction and RFLAGS.RF is clear.
    Done(Kind),
    /// The instruction raised an exception the worker must inject (see
    /// [`Exception::is_software`] for where RIP points).
    Exception { kind: Kind, exception: Exception },
    /// Not emulated; the text names the instruction and why. No register changed. Memory is
    /// unchanged too, except when the backend refused ([`crate::MemFault::Unhandled`]) a later
    /// part of a multi-part store (xsave/fxsave family). The worker should stop the VM with
    /// this message.
    Unsupported(String),
}

impl Outcome {
    /// The instruction class, if the instruction was recognised.
    pub fn kind(&self) -> Option<Kind> {
        match self {
            Outcome::Done(k) | Outcome::Exception { kind: k, .. } => Some(*k),
            Outcome::Unsupported(_) => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Done(k) => write!(f, "{k}: done"),
            Outcome::Exception { kind, exception } => {
                write!(f, "{kind}: exception {}", exception.vector)?;
                if let Some(code) = exception.error_code {
                    write!(f, " error code {code:#x}")?;
                }
                if let Some(cr2) = exception.cr2 {
                    write!(f, " cr2 {cr2:#x}")?;
                }
                Ok(())
            }
            Outcome::Unsupported(why) => write!(f, "unsupported: {why}"),
        }
    }
}

/// Counts of emulated instructions per [`Kind`] (those ending in an exception included), of
/// injected exceptions and of unsupported instructions. Plain counters: keep one per vCPU
/// thread and [`merge`](QuirkCounters::merge) them at exit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuirkCounters {
    per_kind: [u64; Kind::ALL.len()],
    exceptions: u64,
    unsupported: u64,
}

impl QuirkCounters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one emulation result.
    pub fn record(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Done(k) => self.per_kind[k.index()] += 1,
            Outcome::Exception { kind, .. } => {
                self.per_kind[kind.index()] += 1;
                self.exceptions += 1;
            }
            Outcome::Unsupported(_) => self.unsupported += 1,
        }
    }

    pub fn get(&self, kind: Kind) -> u64 {
        self.per_kind[kind.index()]
    }

    /// Emulations that ended in an exception (int3 included).
    pub fn exceptions(&self) -> u64 {
        self.exceptions
    }

    pub fn unsupported(&self) -> u64 {
        self.unsupported
    }

    pub fn total(&self) -> u64 {
        self.per_kind.iter().sum::<u64>() + self.unsupported
    }

    /// Adds another set of counters (e.g. another vCPU's) to this one.
    pub fn merge(&mut self, other: &QuirkCounters) {
        for (a, b) in self.per_kind.iter_mut().zip(other.per_kind.iter()) {
            *a += b;
        }
        self.exceptions += other.exceptions;
        self.unsupported += other.unsupported;
    }

    /// Non-zero counters as `name=count` separated by spaces, in [`Kind::ALL`] order, then
    /// `exceptions=` and `unsupported=` when non-zero; `none` if nothing was counted.
    pub fn report(&self) -> String {
        let mut parts: Vec<String> = Kind::ALL
            .iter()
            .filter(|k| self.get(**k) != 0)
            .map(|k| format!("{}={}", k.name(), self.get(*k)))
            .collect();
        if self.exceptions != 0 {
            parts.push(format!("exceptions={}", self.exceptions));
        }
        if self.unsupported != 0 {
            parts.push(format!("unsupported={}", self.unsupported));
        }
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(" ")
        }
    }
}

impl fmt::Display for QuirkCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report())
    }
}
