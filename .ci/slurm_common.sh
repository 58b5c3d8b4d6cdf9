# slurm.conf settings shared by megatrain's two test clusters: the one-node cluster of
# .ci/setup_services.sh and the two-node network-namespace cluster of tests/launch/netns_cluster.sh.
# Sourced by both; slurm_common_settings prints the lines into their config heredocs.
#
# SlurmdParameters=config_overrides lets a node advertise more CPUs than it has, so several tiny
# 2-task test jobs can share a 2-core CI machine instead of queueing. proctrack/linuxproc and
# task/none need no cgroups (containers rarely delegate them). MinJobAge=4 (seconds a finished job
# stays listed) makes `sbatch --wait` poll every 2 s instead of backing off to 32 s and more (it
# backs off only while below MinJobAge / 2).
slurm_common_settings() {
  cat <<'CONF'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=4
SlurmdTimeout=60
Waittime=0
CONF
}
