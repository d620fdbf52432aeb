/* The trained hover policy as a Crazyflie out-of-tree controller: the file to add to the firmware, and the very file
   preflight.py compiles and flies in MuJoCo (software in the loop).

   The firmware calls controllerOutOfTreeInit() when the controller is selected (and controllerOutOfTreeTest() if
   at start-up), then controllerOutOfTree() at every tick of its 1 kHz stabilizer loop; the policy runs at every
   10th (100 Hz, as it was trained) and the motor commands it set are held in between. It needs, next to it:
     policy.h, policy.c          export.py's C policy: void policy_act(const float obs[17], float action[4])
     controller_policy_params.h  preflight.py's: the action map, the observation scales, the motors' full thrust, and
                                 stored inputs with the policy's expected actions for the self-test
   In the firmware, build with CRAZYFLIE_FIRMWARE defined (an app with CONFIG_CONTROLLER_OOT=y; select the
   controller with the stabilizer.controller parameter) and set the parameter rlpolicy.arm to 1 to fly.

   The safety envelope: motors off until armed and unless the self-test (run by Init) passed; off, and disarmed,
   when no setpoint has come for SETPOINT_TIMEOUT_MS or the state is not finite or its quaternion not a rotation;
   a warm-up of WARMUP_MS (the drone held in a hand or on a stand) that ramps the motors up to hover thrust over
   RAMP_MS and holds it, so that slow motors too turn at hover speed when the policy takes over, as each training
   episode starts; the policy's inputs clipped to the ranges it was trained on. The target is the setpoint's
   position. */
#include <math.h>
#include <string.h>

#ifdef CRAZYFLIE_FIRMWARE
#include "FreeRTOS.h"
#include "task.h"
#include "controller.h"
#include "param.h"
#include "stabilizer_types.h"
#define NOW_MS(tick) T2M(xTaskGetTickCount())  /* the commander stamps setpoints with this clock */
#else
#define NOW_MS(tick) (tick)  /* in the loop: the simulation's ticks, one per ms */
#include "sil_types.h"
#endif
#include "controller_policy_params.h"
#include "policy.h"

#define SETPOINT_TIMEOUT_MS 200
#define WARMUP_MS 1000
#define RAMP_MS 300
#define DEG_TO_RAD 0.017453292519943295f

enum phase { DISARMED, WARMUP, FLYING };

/* All the controller's state, in one struct: the firmware flies one drone, the simulator one per drone. */
static struct {
  uint8_t arm;            /* the parameter: 1 arms, 0 disarms */
  uint8_t tested;         /* the self-test passed */
  enum phase phase;
  uint32_t warmup_start;  /* the tick the warm-up began */
  float action[POLICY_NUM_ACTIONS];  /* the last action, in [-1, 1]: the policy's own input next time */
  float forces[STABILIZER_NR_OF_MOTORS];  /* the command held between policy calls */
} cs;

#ifdef CRAZYFLIE_FIRMWARE
PARAM_GROUP_START(rlpolicy)
PARAM_ADD(PARAM_UINT8, arm, &cs.arm)
PARAM_GROUP_STOP(rlpolicy)
#endif

static float clip1(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

/* Action in [-1, 1] -> the motor's normalized force: rpm = HOVER_RPM (1 + RPM_GAIN a), thrust = KF rpm^2. */
static float normalized_force(float a) {
  float rpm = HOVER_RPM * (1.0f + RPM_GAIN * a);
  float f = KF * rpm * rpm / MAX_THRUST_N;
  return f > 1.0f ? 1.0f : f;
}

static void motors_off(void) {
  for (int i = 0; i < STABILIZER_NR_OF_MOTORS; i++) cs.forces[i] = 0.0f;
}

/* The 17 inputs as the policy was trained on them (env.py's observation), from the firmware's estimate. */
static void observe(float obs[POLICY_NUM_OBS], const setpoint_t *setpoint, const sensorData_t *sensors,
                    const state_t *state) {
  const quaternion_t *q = &state->attitudeQuaternion;
  float s = q->w < 0.0f ? -1.0f : 1.0f;  /* q and -q are one attitude; the policy saw w >= 0 */
  float w = s * q->w, x = s * q->x, y = s * q->y, z = s * q->z;
  float n = sqrtf(w * w + x * x + y * y + z * z);
  w /= n, x /= n, y /= n, z /= n;
  obs[0] = clip1((setpoint->position.x - state->position.x) * OBS_REL_POS_SCALE);
  obs[1] = clip1((setpoint->position.y - state->position.y) * OBS_REL_POS_SCALE);
  obs[2] = clip1((setpoint->position.z - state->position.z) * OBS_REL_POS_SCALE);
  obs[3] = w, obs[4] = x, obs[5] = y, obs[6] = z;
  /* the world velocity into the body frame: R(q)^T v */
  float vx = state->velocity.x, vy = state->velocity.y, vz = state->velocity.z;
  float tx = 2.0f * (y * vz - z * vy), ty = 2.0f * (z * vx - x * vz), tz = 2.0f * (x * vy - y * vx);
  obs[7] = clip1((vx - w * tx + (y * tz - z * ty)) * OBS_LIN_VEL_SCALE);
  obs[8] = clip1((vy - w * ty + (z * tx - x * tz)) * OBS_LIN_VEL_SCALE);
  obs[9] = clip1((vz - w * tz + (x * ty - y * tx)) * OBS_LIN_VEL_SCALE);
  obs[10] = clip1(sensors->gyro.x * DEG_TO_RAD * OBS_ANG_VEL_SCALE);
  obs[11] = clip1(sensors->gyro.y * DEG_TO_RAD * OBS_ANG_VEL_SCALE);
  obs[12] = clip1(sensors->gyro.z * DEG_TO_RAD * OBS_ANG_VEL_SCALE);
  for (int i = 0; i < POLICY_NUM_ACTIONS; i++) obs[13 + i] = cs.action[i];
}

/* Every input finite, and a quaternion that is one (its norm near 1; all zeros is not). */
static int sane_state(const state_t *state, const sensorData_t *sensors) {
  const quaternion_t *q = &state->attitudeQuaternion;
  float sum = state->position.x + state->position.y + state->position.z + state->velocity.x + state->velocity.y
              + state->velocity.z + sensors->gyro.x + sensors->gyro.y + sensors->gyro.z;
  float norm2 = q->w * q->w + q->x * q->x + q->y * q->y + q->z * q->z;
  return isfinite(sum) && norm2 > 0.25f && norm2 < 4.0f;  /* (NaN fails both) */
}

/* The policy on stored inputs must give the actions it gave when exported: a corrupted weight table fails. */
static uint8_t self_test(void) {
  float action[POLICY_NUM_ACTIONS];
  for (int k = 0; k < SELFTEST_CASES; k++) {
    policy_act(SELFTEST_OBS[k], action);
    for (int i = 0; i < POLICY_NUM_ACTIONS; i++)
      if (!(fabsf(action[i] - SELFTEST_ACTION[k][i]) <= SELFTEST_TOLERANCE)) return 0;
  }
  return 1;
}

/* The firmware calls Init when the controller is selected, at start-up or by the stabilizer.controller parameter,
   and Test only at start-up: the self-test runs here, so that it runs either way. */
void controllerOutOfTreeInit(void) {
  memset(&cs, 0, sizeof cs);
  cs.tested = self_test();
}

bool controllerOutOfTreeTest(void) {
  return cs.tested;
}

void controllerOutOfTree(control_t *control, const setpoint_t *setpoint, const sensorData_t *sensors,
                         const state_t *state, const stabilizerStep_t tick) {
  control->controlMode = controlModeForce;
  uint32_t age = (uint32_t)NOW_MS(tick) - setpoint->timestamp;  /* (unsigned: a setpoint from the future is stale) */
  int safe = cs.tested && age <= SETPOINT_TIMEOUT_MS && sane_state(state, sensors);
  if (!cs.arm || !safe) {
    cs.arm = cs.arm && safe;  /* a lost commander or a broken estimate disarms: re-arm to fly */
    cs.phase = DISARMED;
    motors_off();
  } else if (cs.phase == DISARMED) {
    cs.phase = WARMUP;
    cs.warmup_start = tick;
    memset(cs.action, 0, sizeof cs.action);
  }
  if (cs.phase == WARMUP) {  /* up to hover thrust, linearly, held; then the policy from hover (action 0) */
    uint32_t elapsed = tick - cs.warmup_start;
    float hover = normalized_force(0.0f) * (elapsed < RAMP_MS ? (float)elapsed / RAMP_MS : 1.0f);
    for (int i = 0; i < STABILIZER_NR_OF_MOTORS; i++) cs.forces[i] = hover;
    if (elapsed >= WARMUP_MS) cs.phase = FLYING;
  }
  if (cs.phase == FLYING && RATE_DO_EXECUTE(RATE_100_HZ, tick)) {
    float obs[POLICY_NUM_OBS];
    observe(obs, setpoint, sensors, state);
    policy_act(obs, cs.action);
    for (int i = 0; i < STABILIZER_NR_OF_MOTORS; i++) cs.forces[i] = normalized_force(cs.action[i]);
  }
  for (int i = 0; i < STABILIZER_NR_OF_MOTORS; i++) control->normalizedForces[i] = cs.forces[i];
}
