"""The Go2's modes around the policy, as a controller on the robot runs them: one small class, numpy only.

    ZERO_TORQUE --stand_up()--> STAND_UP --stand_up_s + settle_s--> POLICY --fall | stop() | stale command--> DAMPING

    sm = StateMachine(default_angles [12], kp, kd, fall_angle_deg)
    kp, kd, target = sm.update(now, angles [12], gravity [3], policy_target [12])   every control step

update() says what the motors get this step: gains and a target per joint (target None: no stiffness). In POLICY
the target is the policy's (the caller computes it from the action, with its latency); in every other mode the
policy's output is ignored. DAMPING is final: the motors brake the joints (no stiffness, kd damping_kd) until a
person takes over, as the Unitree robots' own damping mode does. Joint order is the caller's, the same throughout.
"""
import enum
import math

import numpy as np

# STAND_UP's gains [N m / rad, N m s / rad], stiffer than the policy's kp 20, kd 0.5: with those, the Go2 lifts
# itself from lying only to 0.22 m, pitched 14 degrees nose up, its rear calves 0.6 rad short of the default pose
# (MuJoCo, sim2sim.py's model), past the fall angle before the policy starts. At 50 it stands at 0.31 m, level
# within 2 degrees; POLICY then holds the policy's own gains.
STAND_KP, STAND_KD = 50.0, 3.0


class Mode(enum.Enum):
    ZERO_TORQUE = 0  # motors off: the robot as it lies
    STAND_UP = 1  # targets slide from the pose it started in to the default pose, then hold it
    POLICY = 2  # the policy's targets
    DAMPING = 3  # no stiffness, only damping: the joints fold slowly, the robot sinks


def tilt_deg(gravity):
    """(roll, pitch) in degrees of a base whose gravity direction in its own frame is gravity [3] (go2_env.tilt_deg
    for one robot): roll = atan2(-g_y, -g_z), pitch = asin(g_x)."""
    return (math.degrees(math.atan2(-gravity[1], -gravity[2])),
            math.degrees(math.asin(max(-1.0, min(1.0, gravity[0])))))


class StateMachine:
    def __init__(self, default_angles, kp, kd, fall_angle_deg, stand_up_s=1.5, settle_s=0.5,
                 command_timeout_s=0.5, damping_kd=3.0, stand_kp=STAND_KP, stand_kd=STAND_KD):
        self.default_angles = np.asarray(default_angles, dtype=np.float64)  # [12]
        self.kp, self.kd, self.fall_angle_deg = kp, kd, fall_angle_deg  # the policy's gains, POLICY's
        self.stand_kp, self.stand_kd = stand_kp, stand_kd
        self.stand_up_s, self.settle_s = stand_up_s, settle_s
        self.command_timeout_s, self.damping_kd = command_timeout_s, damping_kd
        self.mode, self.reason = Mode.ZERO_TORQUE, ""  # reason: why DAMPING was entered
        self._since = 0.0  # when the current mode began [s]
        self._start_angles = None  # [12] the pose STAND_UP starts from
        self._last_command = -math.inf  # when the last velocity command arrived [s]

    def stand_up(self, now, angles):
        """ZERO_TORQUE -> STAND_UP from the current joint angles [12]."""
        if self.mode is Mode.ZERO_TORQUE:
            self._enter(Mode.STAND_UP, now)
            self._start_angles = np.array(angles, dtype=np.float64)

    def command(self, now):
        """A velocity command arrived (from the operator's joystick or planner): the policy may walk on it."""
        self._last_command = now

    def stop(self, now):
        """The operator's stop: from any mode but ZERO_TORQUE, to DAMPING."""
        if self.mode is not Mode.ZERO_TORQUE:
            self._damp(now, "stop")

    def update(self, now, angles, gravity, policy_target=None):
        """The motors' (kp, kd, target) for this control step, after the transitions that now, the joint angles [12]
        and the gravity direction in the base frame [3] call for."""
        if self.mode is Mode.STAND_UP and now - self._since >= self.stand_up_s + self.settle_s:
            self._enter(Mode.POLICY, now)
            self._last_command = max(self._last_command, now)  # the command timeout counts from here at the earliest
        if self.mode is Mode.POLICY:
            roll, pitch = tilt_deg(gravity)
            if max(abs(roll), abs(pitch)) > self.fall_angle_deg:
                self._damp(now, f"fall (roll {roll:.0f} deg, pitch {pitch:.0f} deg)")
            elif now - self._last_command > self.command_timeout_s:
                self._damp(now, f"stale command (none for {now - self._last_command:.2f} s)")
        if self.mode is Mode.ZERO_TORQUE:
            return 0.0, 0.0, None
        if self.mode is Mode.STAND_UP:
            share = min(1.0, (now - self._since) / self.stand_up_s)  # 0 -> 1 over stand_up_s, then held
            return self.stand_kp, self.stand_kd, self._start_angles + share * (self.default_angles - self._start_angles)
        if self.mode is Mode.POLICY:
            return self.kp, self.kd, policy_target
        return 0.0, self.damping_kd, None

    def _enter(self, mode, now):
        self.mode, self._since = mode, now

    def _damp(self, now, reason):
        if self.mode is not Mode.DAMPING:
            self._enter(Mode.DAMPING, now)
            self.reason = reason
