/* Software in the loop: controller_policy.c, unchanged, flying N simulated drones (preflight.py loads this as a
   shared library). The controller keeps one drone's state in its static struct, as on the Crazyflie; each drone's
   copy lives in the caller's memory and is swapped in and out around its call. */
#include <string.h>

#include "controller_policy.c"

size_t sil_state_bytes(void) { return sizeof cs; }

/* A drone's controller from scratch: init, self-test, then armed. Returns the self-test's verdict. */
int sil_start(unsigned char *slot) {
  controllerOutOfTreeInit();
  bool passed = controllerOutOfTreeTest();
  cs.arm = 1;
  memcpy(slot, &cs, sizeof cs);
  return passed;
}

/* One stabilizer tick of n drones: their setpoints (position [n, 3] m, timestamp [n] ms), estimates (position
   [n, 3] m and velocity [n, 3] m/s in the world frame, quaternion [n, 4] x y z w) and gyros [n, 3] deg/s ->
   normalized forces [n, 4] and whether each drone's policy is flying [n]. */
void sil_tick(int n, unsigned char *slots, uint32_t tick, const float *target, const uint32_t *setpoint_ms,
              const float *position, const float *velocity, const float *quaternion, const float *gyro, float *forces,
              int *flying) {
  control_t control;
  setpoint_t setpoint;
  sensorData_t sensors;
  state_t state;
  memset(&sensors, 0, sizeof sensors);
  for (int k = 0; k < n; k++) {
    const float *p = position + 3 * k, *v = velocity + 3 * k, *q = quaternion + 4 * k, *g = gyro + 3 * k;
    setpoint.timestamp = setpoint_ms[k];
    setpoint.position.x = target[3 * k], setpoint.position.y = target[3 * k + 1];
    setpoint.position.z = target[3 * k + 2];
    state.position.x = p[0], state.position.y = p[1], state.position.z = p[2];
    state.velocity.x = v[0], state.velocity.y = v[1], state.velocity.z = v[2];
    state.attitudeQuaternion.x = q[0], state.attitudeQuaternion.y = q[1];
    state.attitudeQuaternion.z = q[2], state.attitudeQuaternion.w = q[3];
    sensors.gyro.x = g[0], sensors.gyro.y = g[1], sensors.gyro.z = g[2];
    memcpy(&cs, slots + k * sizeof cs, sizeof cs);
    controllerOutOfTree(&control, &setpoint, &sensors, &state, tick);
    memcpy(slots + k * sizeof cs, &cs, sizeof cs);
    memcpy(forces + 4 * k, control.normalizedForces, sizeof control.normalizedForces);
    flying[k] = cs.phase == FLYING;
  }
}
