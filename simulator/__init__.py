"""Cost simulator: predicted seconds and memory of RLHF stages as sums of named terms."""
from simulator.cluster import Cluster, ClusterError
from simulator.costs import Cost, DoesNotFit, Memory, Term
from simulator.job import ALGORITHMS, STAGES, Job, JobError
from simulator.layout import GenLayout, LayoutError, TrainLayout
from simulator.model import ModelError, ModelSpec, load_model
from simulator.placement import PlacedSet
from simulator.predict import Prediction, predict_plan, predict_set
from simulator.profile import Profile, ProfileError, available_profiles, load_profile
from simulator.reshard import SCHEMES, reshard_bytes_per_rank, reshard_peak_bytes

__all__ = ["ALGORITHMS", "Cluster", "ClusterError", "Cost", "DoesNotFit", "GenLayout", "Job",
           "JobError", "LayoutError", "Memory", "ModelError", "ModelSpec", "PlacedSet",
           "Prediction", "Profile", "ProfileError", "SCHEMES", "STAGES", "Term", "TrainLayout",
           "available_profiles", "load_model", "load_profile", "predict_plan", "predict_set",
           "reshard_bytes_per_rank", "reshard_peak_bytes"]
