//! Which rank this process is, read the way cluster launchers set it: torchrun's `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`, or SLURM's `SLURM_PROCID`,
//! `SLURM_NTASKS` and `SLURM_LOCALID` (with `MASTER_ADDR` / `MASTER_PORT` from the job script).
//! With none of them set, the run is one rank.

use anyhow::{bail, Context, Result};

/// The port rank 0 listens on when a SLURM job names no `MASTER_PORT` (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;

/// This process's place in the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The rank's index on its node: the GPU it uses.
    pub local_rank: usize,
    /// Where rank 0 listens for the others (`None` for one rank).
    pub master: Option<(String, u16)>,
}

impl World {
    /// One rank, no rendezvous.
    pub fn single() -> World {
        World { rank: 0, size: 1, local_rank: 0, master: None }
    }

    /// The launcher's variables from the environment.
    pub fn from_env() -> Result<World> {
        World::from_vars(|k| std::env::var(k).ok())
    }

    /// The launcher's variables from `get` (the environment, or a test's map): torchrun's when
    /// `RANK` or `WORLD_SIZE` is set, else SLURM's when `SLURM_PROCID` is, else one rank.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<World> {
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{k}={v:?} is not a non-negative integer"))
                })
                .transpose()
        };
        let (rank, size, local, launcher) = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let (Some(rank), Some(size)) = (num("RANK")?, num("WORLD_SIZE")?) else {
                bail!("RANK and WORLD_SIZE go together (torchrun sets both); only one is set");
            };
            (rank, size, num("LOCAL_RANK")?.unwrap_or(rank), "torchrun")
        } else if get("SLURM_PROCID").is_some() {
            let (Some(rank), Some(size)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) else {
                bail!("SLURM_PROCID is set but SLURM_NTASKS is not");
            };
            (rank, size, num("SLURM_LOCALID")?.unwrap_or(0), "slurm")
        } else {
            return Ok(World::single());
        };
        if size == 0 {
            bail!("the world size is 0 ({launcher}'s variables)");
        }
        if rank >= size {
            bail!("rank {rank} is not below the world size {size} ({launcher}'s variables)");
        }
        if size == 1 {
            return Ok(World { rank, size, local_rank: local, master: None });
        }
        let addr = get("MASTER_ADDR").filter(|a| !a.trim().is_empty()).with_context(|| {
            format!("{size} ranks need MASTER_ADDR, the host of rank 0 (for SLURM: the first host of the job's node list)")
        })?;
        let port = match get("MASTER_PORT") {
            Some(p) => match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => bail!("MASTER_PORT={p:?} is not a port number (1 to 65535)"),
                Ok(n) => n,
            },
            None if launcher == "slurm" => DEFAULT_PORT,
            None => bail!("{size} ranks need MASTER_PORT (torchrun sets it)"),
        };
        Ok(World { rank, size, local_rank: local, master: Some((addr.trim().to_string(), port)) })
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<World> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        World::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_slurm_and_none() {
        assert_eq!(world(&[]).unwrap(), World::single());
        let w = world(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29501"),
        ])
        .unwrap();
        assert_eq!(w, World { rank: 3, size: 8, local_rank: 3, master: Some(("10.0.0.1".into(), 29501)) });
        let w = world(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "node7"),
        ])
        .unwrap();
        assert_eq!(
            w,
            World { rank: 5, size: 16, local_rank: 1, master: Some(("node7".into(), DEFAULT_PORT)) }
        );
        assert_eq!(world(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap().master, None);
    }

    #[test]
    fn bad_variables_are_named() {
        let err = |v: &[(&str, &str)]| format!("{:#}", world(v).unwrap_err());
        assert!(err(&[("RANK", "1")]).contains("RANK and WORLD_SIZE"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")])
            .contains("rank 2 is not below the world size 2"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("MASTER_ADDR"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]).contains("MASTER_PORT"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")])
            .contains("not a port number"));
        assert!(err(&[("SLURM_PROCID", "0")]).contains("SLURM_NTASKS"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "0")]).contains("world size is 0"));
    }
}
