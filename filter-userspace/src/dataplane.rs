//! `Dataplane`: the only code that touches the kernel program and its maps.
//!
//! It loads the embedded object with the load-time configuration, writes the policy into the
//! maps, attaches the classifier to each interface (TCX links, kernel ≥ 6.6), and hands the
//! event ring to the responder. Every map write's result is checked; a failed write leaves the
//! policy in force unchanged and is reported to the caller.
//!
//! Fail mode: the TCX links belong to this process. When the daemon exits, for any reason,
//! the kernel detaches the classifier and traffic flows unfiltered (fail-open).

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use filter_common::{
    hash, LoadConfig, Reason, RuleValue, Settings, GLOBAL_CONFIG, MAP_EVENTS, MAP_RULES,
    MAP_SETTINGS, MAP_STATS, PROG_INGRESS, RULES_MAX,
};

use crate::policy::{Policy, Rule};

/// Rules one policy map holds.
pub const RULES_CAPACITY: usize = RULES_MAX as usize;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/filter-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("this filterd was built without the kernel object; build it with `cargo xtask build`")]
    NoObject,
    #[error("loading the kernel object failed: {0} (filterd needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_NET_RAW)")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel object has no {0}")]
    Missing(&'static str),
    #[error("the verifier rejected {PROG_INGRESS}: {io_error}\n{log}")]
    Verifier {
        io_error: std::io::Error,
        log: String,
    },
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: ProgramError,
    },
    #[error("interface {iface}: cannot attach the classifier: {source}")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Debug)]
pub struct TestRunOutput {
    /// The TC action (`-1` pass on, `2` drop).
    pub action: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Mean run time per repetition, as the kernel measured it.
    pub duration: std::time::Duration,
}

pub struct Dataplane {
    // Keeps the program loaded and its links attached; dropping it detaches.
    ebpf: Ebpf,
    rules: [HashMap<MapData, u64, RuleValue>; 2],
    settings: Array<MapData, Settings>,
    stats: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    key: [u64; 2],
    active: u32,
    /// Whether the inactive map may hold entries (it is cleared before the next full apply).
    inactive_dirty: bool,
    attached: Vec<String>,
}

impl Dataplane {
    /// Load and verify the classifier with a fresh random hash key. Nothing is attached yet
    /// and the policy is empty (default `any`) until [`Dataplane::apply`] writes one.
    pub fn load(ports: &[u16]) -> Result<Dataplane, DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).expect("the kernel's random source is available");
        let key = [
            u64::from_le_bytes(key[..8].try_into().unwrap()),
            u64::from_le_bytes(key[8..].try_into().unwrap()),
        ];
        let mut config = Box::new(LoadConfig::zeroed());
        config.hash_key = key;
        for &p in ports {
            config.add_port(p);
        }
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_CONFIG, &*config, true)
            .load(OBJECT)
            .map_err(DataplaneError::Load)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_INGRESS)
            .ok_or(DataplaneError::Missing(PROG_INGRESS))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: PROG_INGRESS.into(),
                source,
            })?;
        prog.load().map_err(|e| match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                // The log's tail says why; the whole log can run to megabytes.
                let log = verifier_log.to_string();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let log = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                DataplaneError::Verifier { io_error, log }
            }
            source => DataplaneError::Program {
                what: PROG_INGRESS.into(),
                source,
            },
        })?;

        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(DataplaneError::Missing(name));
        let rules = [
            HashMap::try_from(take(MAP_RULES[0])?).map_err(map_err(MAP_RULES[0]))?,
            HashMap::try_from(take(MAP_RULES[1])?).map_err(map_err(MAP_RULES[1]))?,
        ];
        let settings = Array::try_from(take(MAP_SETTINGS)?).map_err(map_err(MAP_SETTINGS))?;
        let stats = PerCpuArray::try_from(take(MAP_STATS)?).map_err(map_err(MAP_STATS))?;
        let events = RingBuf::try_from(take(MAP_EVENTS)?).map_err(map_err(MAP_EVENTS))?;
        let mut dp = Dataplane {
            ebpf,
            rules,
            settings,
            stats,
            events: Some(events),
            key,
            active: 0,
            inactive_dirty: false,
            attached: Vec::new(),
        };
        dp.apply(&Policy::default())?;
        Ok(dp)
    }

    /// Attach the classifier to `iface`'s ingress.
    pub fn attach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_INGRESS)
            .ok_or(DataplaneError::Missing(PROG_INGRESS))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: PROG_INGRESS.into(),
                source,
            })?;
        prog.attach(iface, TcAttachType::Ingress)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.into(),
                source,
            })?;
        self.attached.push(iface.to_owned());
        Ok(())
    }

    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// The event ring, for the responder (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    fn key_of(&self, path: &str) -> u64 {
        // Validated rule paths are at most PATH_MAX bytes.
        hash::hash_slice(&self.key, path.as_bytes()).expect("rule paths are validated")
    }

    /// Replace the whole policy atomically: the new rules go into the inactive map, then one
    /// `SETTINGS` write switches the classifier over. On error the old policy stays in force.
    pub fn apply(&mut self, policy: &Policy) -> Result<(), DataplaneError> {
        let next = 1 - self.active;
        let name = MAP_RULES[next as usize];
        if self.inactive_dirty {
            let map = &mut self.rules[next as usize];
            let keys = map
                .keys()
                .collect::<Result<Vec<_>, _>>()
                .map_err(map_err(name))?;
            for k in keys {
                map.remove(&k).map_err(map_err(name))?;
            }
        }
        self.inactive_dirty = true;
        for rule in policy.rules.values() {
            let k = self.key_of(&rule.path);
            let v = RuleValue {
                allow: rule.effective().0,
                flags: 0,
            };
            self.rules[next as usize]
                .insert(k, v, 0)
                .map_err(map_err(name))?;
        }
        let s = Settings {
            active_rules: next,
            default_allow: policy.default.effective().0,
            flags: 0,
            _reserved: 0,
        };
        self.settings.set(0, s, 0).map_err(map_err(MAP_SETTINGS))?;
        // The old map keeps its entries until the next full apply clears it, so a packet that
        // read the old index just before the switch still finds the old policy complete.
        self.active = next;
        Ok(())
    }

    /// Add or replace one rule in the policy in force (one atomic map update).
    pub fn upsert(&mut self, rule: &Rule) -> Result<(), DataplaneError> {
        let k = self.key_of(&rule.path);
        let v = RuleValue {
            allow: rule.effective().0,
            flags: 0,
        };
        self.rules[self.active as usize]
            .insert(k, v, 0)
            .map_err(map_err(MAP_RULES[self.active as usize]))
    }

    /// Remove one rule from the policy in force.
    pub fn remove(&mut self, path: &str) -> Result<(), DataplaneError> {
        let k = self.key_of(path);
        match self.rules[self.active as usize].remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAP_RULES[self.active as usize])(e)),
        }
    }

    /// Run one frame through the loaded classifier with `BPF_PROG_TEST_RUN` (no attachment
    /// needed): the kernel fixture tests and the per-packet cost benchmark use this.
    pub fn test_run(&mut self, frame: &[u8], repeat: u32) -> Result<TestRunOutput, DataplaneError> {
        use aya::programs::TestRun as _;
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_INGRESS)
            .ok_or(DataplaneError::Missing(PROG_INGRESS))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: PROG_INGRESS.into(),
                source,
            })?;
        let mut out = vec![0u8; frame.len() + 256];
        let opts = aya::programs::TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let r = prog
            .test_run(opts)
            .map_err(|source| DataplaneError::Program {
                what: "BPF_PROG_TEST_RUN".into(),
                source,
            })?;
        out.truncate(r.data_size_out as usize);
        Ok(TestRunOutput {
            action: r.return_value as i32,
            frame: out,
            duration: r.duration,
        })
    }

    /// Verdict counters summed over CPUs, by reason.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Reason::ALL
            .iter()
            .map(|&r| {
                let per_cpu = self.stats.get(&(r as u32), 0).map_err(map_err(MAP_STATS))?;
                Ok((r, per_cpu.iter().sum()))
            })
            .collect()
    }
}
